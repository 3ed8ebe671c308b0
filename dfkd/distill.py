"""``dfkd distill``: Hinton knowledge distillation of a student on a synthetic set.

``L_KD = T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch
(Hinton, Vinyals & Dean 2015), with ``t`` the teacher's logits and ``s`` the
student's. No true label is used. With a teacher at hand (the default), every epoch's
inputs are augmented (``affine``: each sample its own small rotation, scale and shift;
``shift``: one translation of up to 2 pixels per batch; ``shift+mix``: then a convex
mix with the reversed batch) and the teacher labels what the student sees, the whole
epoch in one bulk pass before its steps; without one, the logits stored in the shards
are the targets and the inputs are used as they are. The student's accuracy on the
real test set is logged (every ``eval_every`` epochs) but never picks the model: the
last epoch's student is the one saved.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model, read_json, save_model
from .config import DistillConfig, to_dict
from .data import ImageSet, load_mnist, to_input
from .errors import DfkdError
from .evaluate import accuracy
from .models import build_model, model_input_shape, predict_logits
from .reconstruct import load_synthetic
from .runtime import pick_device, seed_everything, setup_threads
from .train import fit, model_info


AUGMENTS = ("shift", "affine", "shift+mix", "none")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss, scaled by ``T^2`` so gradients keep their size across T."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature ** 2


def augment(x: torch.Tensor, how: str, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Augment a batch: ``shift`` translates the whole batch by up to ``pad`` pixels
    (zero-filled); ``shift+mix`` then mixes it with its reverse; ``affine`` gives every
    sample its own random rotation (+-15 degrees), scale (0.9 to 1.1) and translation
    (+-``pad`` pixels), bilinear with zero fill."""
    if how == "none":
        return x
    if how == "affine":
        n, h = len(x), x.shape[2]
        ang = (torch.rand(n, generator=g) * 2 - 1) * (math.pi / 12)
        scale = 1 / (0.9 + 0.2 * torch.rand(n, generator=g))
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * pad / h)
        cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    x = F.pad(x, (pad, pad, pad, pad))[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    if how == "shift+mix":
        lam = torch.rand((len(x), 1, 1, 1), generator=g).to(x.device)
        x = lam * x + (1 - lam) * x.flip(0)
    return x


def distill_model(student: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor, cfg: DistillConfig,
                  test: ImageSet | None = None, state_path: Path | None = None,
                  teacher: nn.Module | None = None) -> list[dict]:
    """Distill ``student`` on inputs ``x``: soft targets from ``teacher`` online (augmented
    inputs), or the stored ``teacher_logits`` when no teacher is given."""
    if cfg.augment not in AUGMENTS:
        raise DfkdError("--augment", f"{cfg.augment!r} is not one of {', '.join(AUGMENTS)}")
    shape = model_input_shape(student)
    if tuple(x.shape[1:]) != tuple(shape):
        raise DfkdError("synthetic set", f"inputs of shape {tuple(x.shape[1:])} do not fit the student's {tuple(shape)}")
    with torch.no_grad():
        probe = student(x[:2].to(next(student.parameters()).device))
    if probe.shape[1] != teacher_logits.shape[1]:
        raise DfkdError("synthetic set", f"the teacher has {teacher_logits.shape[1]} classes, "
                        f"the student {probe.shape[1]}")
    on_epoch = None
    if test is not None:
        xt = to_input(test.test_x, shape)
        on_epoch = lambda m: {"test_accuracy": accuracy(m, xt, test.test_y)}  # noqa: E731
    def label(xe, _te, g):  # augment batch by batch (as the steps will see them), label in bulk
        xa = torch.cat([augment(xe[i:i + cfg.batch_size], cfg.augment, g) for i in range(0, len(xe), cfg.batch_size)])
        return xa, predict_logits(teacher, xa)

    def batch_loss(m, xb, tb, g):
        return kd_loss(m(xb), tb, cfg.temperature)
    return fit(student, x, teacher_logits, batch_loss, epochs=cfg.epochs,
               batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, schedule=cfg.schedule, state_path=state_path,
               on_epoch=on_epoch, eval_every=cfg.eval_every, prepare=label if teacher is not None else None,
               desc=f"distill {getattr(student, 'arch', '')}", progress=cfg.progress)


def distill(synthetic: str | Path, out: str | Path, cfg: DistillConfig = DistillConfig(),
            data_dir: str | None = None, teacher: str | Path | None = None) -> Path:
    """``dfkd distill``: train a registry student on a synthetic set; save it like a teacher."""
    setup_threads()
    seed_everything(cfg.seed)
    x, _, logits = load_synthetic(synthetic)
    manifest = read_json(Path(synthetic) / "manifest.json" if Path(synthetic).is_dir() else synthetic)
    dev = pick_device(cfg.device)
    tmodel = None
    if teacher is not None:
        tmodel, tdesc = load_model(teacher)
        if tdesc.get("sha256") != manifest.get("teacher_sha256"):
            raise DfkdError(synthetic, "this synthetic set was made from another teacher")
        tmodel.to(dev)
    student = build_model(cfg.student).to(dev)
    data = load_mnist(data_dir)
    out = Path(out)
    history = distill_model(student, x, logits, cfg, data, state_path=out.parent / "state" / f"distill-{out.name}.pt",
                            teacher=tmodel)
    info = model_info(student.cpu(), data, test_accuracy=history[-1]["test_accuracy"], history=history,
                      distill_config=to_dict(cfg), objective=manifest.get("objective"),
                      teacher_sha256=manifest.get("teacher_sha256"), synthetic=str(synthetic), synthetic_images=len(x))
    return save_model(student.cpu(), out, info)
