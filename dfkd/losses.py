"""The losses the stages share: Hinton's soft-target loss (distillation's, and the generator's student and
disagreement terms), the image priors (reconstruction's and the generator's), and the generator's diversity.
Each is a plain function of tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss, scaled by ``T^2`` so gradients keep their size across T."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature ** 2


def disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per sample ``KL(softmax(t) || softmax(s))``, counted only where the student already picks the teacher's
    class (elsewhere 0): a generator rewarded by it seeks inputs where the two part, without being driven to
    inputs the teacher itself finds ambiguous (Fast-Datafree's masked adversarial term). Returns ``[B]``."""
    kl = (F.softmax(teacher_logits, 1) * (F.log_softmax(teacher_logits, 1) - F.log_softmax(student_logits, 1))).sum(1)
    return kl * (student_logits.argmax(1) == teacher_logits.argmax(1)).to(kl)


def mode_seeking(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Diversity of a batch made as two halves of the same labels from latents ``z``: the mean over pairs
    ``i`` (sample ``i`` of the first half, ``i`` of the second) of ``mean|x_a - x_b| / mean|z_a - z_b|``
    (Mao et al.'s mode-seeking ratio, 2019). A generator maximises it: two latents of one class should not
    give one image. An odd last sample is left out."""
    h = len(x) // 2
    dx = (x[:h] - x[h:2 * h]).abs().flatten(1).mean(1)
    dz = (z[:h] - z[h:2 * h]).abs().flatten(1).mean(1)
    return (dx / dz.clamp_min(1e-8)).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute difference between neighbouring pixels (an image prior)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def prior(x: torch.Tensor, tv: float, l2: float) -> torch.Tensor:
    """The image priors' batch total: ``tv * TV(x) + l2 * mean(x^2)`` per sample, summed (images only for
    TV); ``x`` in the network's input units."""
    total = x.new_zeros(())
    if tv and x.dim() == 4:
        total = total + tv * total_variation(x).sum()
    if l2:
        total = total + l2 * x.pow(2).flatten(1).mean(1).sum()
    return total
