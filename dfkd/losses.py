"""The losses the stages share: Hinton's soft-target loss (distillation's, and the generator's student and
disagreement terms), the image priors (reconstruction's and the generator's), and the generator's diversity.
Each is a plain function of tensors; ``check_seams`` refuses a seam prior's settings that cannot work."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DfkdError


# above this a KD temperature flattens every soft label to near uniform (far above, its square, the loss's scale,
# overflows): the flags refuse it (``cli_fields``, ``profiles``)
MAX_TEMPERATURE = 1000.0


def temperature_problem(t: object) -> str | None:
    """Why ``t`` cannot be a softmax temperature (not a number in (0, MAX_TEMPERATURE]), or None."""
    ok = not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t <= MAX_TEMPERATURE  # NaN fails the range
    return None if ok else f"{t!r} is not a number > 0 and <= {MAX_TEMPERATURE:g}"


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
    """Per-sample mean absolute difference between neighbouring pixels (an image prior): every pair of
    neighbours crosses a seam of 1 x 1 patches."""
    return patch_seams(x, 1)


def patch_seams(x: torch.Tensor, p: int) -> torch.Tensor:
    """Per-sample mean absolute difference between neighbouring pixels that lie in different ``p`` x ``p``
    patches of a grid from the top left corner (a ViT's patch embedding): total variation across the
    patches' seams only, rows and columns summed as in ``total_variation``."""
    h, w = x.shape[-2:]
    dh = (x[..., p::p, :] - x[..., p - 1:h - 1:p, :]).abs().flatten(1).mean(1) if h > p else x.new_zeros(len(x))
    dw = (x[..., :, p::p] - x[..., :, p - 1:w - 1:p]).abs().flatten(1).mean(1) if w > p else x.new_zeros(len(x))
    return dh + dw


def check_seams(patch_tv: float, patch: int) -> None:
    """Refuses a seam prior that cannot be computed or does nothing: a negative or non-finite weight, a side
    that is not a whole number >= 0, a weight without a side of at least 2, or a side without a weight."""
    if not (math.isfinite(patch_tv) and patch_tv >= 0):
        raise DfkdError("patch_tv", f"{patch_tv:g} is not a finite weight >= 0")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 0:
        raise DfkdError("patch", f"{patch!r} is not a whole number of pixels >= 0")
    if patch_tv and patch < 2:
        raise DfkdError("patch", f"--patch-tv {patch_tv:g} needs the patches' side, --patch >= 2 (a ViT's patch size), "
                        f"not {patch}")
    if patch and not patch_tv:
        raise DfkdError("patch", f"--patch {patch} does nothing without a --patch-tv weight > 0")


def seam_prior(x: torch.Tensor, patch_tv: float, patch: int) -> torch.Tensor:
    """The seam prior's batch total, ``patch_tv * seams(x, patch)`` summed over samples (images only), on
    ``x`` as the teacher sees it: its patch grid stays put when the inputs are rolled or viewed."""
    if not patch_tv or x.dim() != 4:
        return x.new_zeros(())
    return patch_tv * patch_seams(x, patch).sum()


def prior(x: torch.Tensor, tv: float, l2: float) -> torch.Tensor:
    """The image priors' batch total: ``tv * TV(x) + l2 * mean(x^2)`` per sample, summed (images only for
    TV); ``x`` in the network's input units."""
    total = x.new_zeros(())
    if tv and x.dim() == 4:
        total = total + tv * total_variation(x).sum()
    if l2:
        total = total + l2 * x.pow(2).flatten(1).mean(1).sum()
    return total
