"""``dfkd reconstruct``: a class-balanced synthetic set from a frozen teacher and its metadata.

Each batch starts from i.i.d. ``N(init_mean, init_std)`` raw values (``init="noise"``, the
paper's start) or from each sample's class mean input plus ``N(0, init_std)`` (``class-mean``:
the mean the file reveals in closed form, ``inversion.revealed_means``; ``auto``: that where the
file reveals it, else noise), draws its targets once, and runs Adam on the raw inputs only (the
teacher sees them through its normalisation, ``data.at_input``; ``lr`` is a step in the teacher's input
units), clamping them to the data's raw range after each step; with ``basis="fourier"`` Adam moves the Fourier
coefficients of each input's change from its start instead (``basis.Fourier``), and the image is clamped as the
teacher sees it. Batch ``b`` uses a
generator seeded from ``(seed, b)`` and becomes one shard of the ``SyntheticSet``: an
interrupted run resumes at the first unlisted shard and gives bit-identical shards; a set made with
other settings is refused (``restart``: started over), and no shard holding a non-finite value is written.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from . import distributed
from .basis import BASES, Fourier
from .config import ReconstructConfig, Runtime, to_dict
from .data import DataInfo, at_input
from .errors import DfkdError
from .fastgrad import input_grad_by_fold
from .files import exclusive, weights_sha256
from .images import save_grid
from .inversion import revealed_means
from .kinds import means_kind
from .losses import check_seams, prior, seam_prior
from .metadata import Metadata, load
from .models import device_of, num_outputs
from .objective import Objective
from .objectives import Noise, make_objective
from .runtime import bars_off, pick_device, setup_threads
from .specs import ModelRef, open_model
from .synthetic import SyntheticSet
from .taps import tap
from .views import SEEN, SEEN_FORM, seen
from .views import jitter as roll


INITS = ("noise", "class-mean", "auto")
ADAM_EPS = 1e-8  # torch.optim.Adam's default


def _batch_seed(seed: int, b: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dfkd-reconstruct|{seed}|{b}".encode()).digest()[:8], "little") >> 1


def _leaves(x: torch.Tensor, info: DataInfo, lr: float) -> list[dict]:
    """Adam's parameter groups for raw inputs ``x``: one per channel where the channels' stds differ, each
    with ``lr`` and Adam's ``eps`` scaled by its std (a raw gradient is the network's over std), so that the
    steps are exactly Adam's in the network's input units: a recipe carries across data ranges (0..1 or
    0..255) and channels normalised apart."""
    eps = ADAM_EPS
    if len(info.std) == 1:
        return [{"params": [x], "lr": lr * info.std[0], "eps": eps / info.std[0]}]
    return [{"params": [xc.clone()], "lr": lr * s, "eps": eps / s} for xc, s in zip(x.split(1, dim=1), info.std)]


def optimise_batch(teacher: nn.Module, objective: Objective, labels: torch.Tensor, cfg: ReconstructConfig,
                   g: torch.Generator, info: DataInfo, bar: tqdm | None = None,
                   start: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Optimise one batch of raw inputs for ``objective``, starting from ``start[label]`` (raw class means
    ``[C, *shape]``) or ``init_mean`` plus ``N(0, init_std)`` noise, clamped to the data's range; the
    network sees them under ``cfg.views`` (``views.seen``), normalised and rolled by ``cfg.jitter``; the priors
    act on them normalised, without the view (as ``lr`` does). Returns the raw inputs and the [first, last]
    loss per sample."""
    dev = device_of(teacher)
    centre = start[labels] if start is not None else cfg.init_mean
    x = centre + cfg.init_std * torch.randn((len(labels), *info.shape), generator=g)
    if cfg.clamp:
        info.clamp(x)
    if isinstance(objective, Noise) or cfg.steps == 0:
        return x, [float("nan"), float("nan")]
    tg = {k: v.to(dev) for k, v in objective.targets(labels, g).items()}
    masks = {k: v.to(dev) for k, v in objective.masks(info.shape, len(labels), g).items()} \
        if hasattr(objective, "masks") else {}
    alter = (lambda p, out: out * masks[p] if p in masks else out) if masks else None
    if cfg.basis == "fourier":  # the coefficients of the change from the start (``basis``), clamped as they are seen
        four = Fourier(info.to_model(x.to(dev)))
        groups, leaves = [{"params": [four.coef]}], [four.coef]
        raw = lambda: info.to_raw(four.image()).clamp(info.low, info.high) if cfg.clamp \
            else info.to_raw(four.image())  # noqa: E731
    else:
        groups = _leaves(x.to(dev), info, cfg.lr)
        leaves = [p for grp in groups for p in grp["params"]]
        for p in leaves:
            p.requires_grad_(True)
        raw = lambda: torch.cat(leaves, 1) if len(leaves) > 1 else leaves[0]  # noqa: E731
    ydev = labels.to(dev)
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    losses = []
    with tap(teacher, objective.layers(), alter=alter, inputs=objective.inputs()) as acts, \
            input_grad_by_fold(teacher, dev.type == "cpu"):
        for step in range(cfg.steps):
            xr = raw()
            xn = info.to_model(xr)  # at the network's input
            xin = roll(info.to_model(seen(xr, cfg.views, g, info.low, info.high)) if cfg.views != "none" else xn,
                       cfg.jitter, g)
            logits = teacher(xin * masks["input"] if masks else xin)
            loss = (objective.loss(logits, acts, tg, ydev) + prior(xn, cfg.tv, cfg.l2)
                    + seam_prior(xin, cfg.patch_tv, cfg.patch))
            if cfg.ce:  # summed over the batch, as the objective is: per input, a generator's ce
                loss = loss + cfg.ce * F.cross_entropy(logits.float(), ydev, reduction="sum")
            if not torch.isfinite(loss):
                raise DfkdError("lr", f"loss became {loss.item()} at step {step}; finished shards are kept "
                                "(try a lower lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.clamp and cfg.basis == "pixel":
                with torch.no_grad():
                    for p in leaves:
                        info.clamp(p)
            if step == 0 or step == cfg.steps - 1:
                losses.append(loss.item() / len(labels))
            if bar is not None:
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{loss.item() / len(labels):.4g}", refresh=False)
    with torch.no_grad():
        return raw().detach().cpu(), losses


def _manifest_key(cfg: ReconstructConfig, teacher_sha: str, meta: Metadata | None) -> dict:
    return {"config": to_dict(cfg), "teacher_sha256": teacher_sha,
            "stats_sha256": meta.header.get("tensors_sha256") if meta is not None else None}


def reconstruct(teacher: nn.Module, meta: Metadata | None, out: str | Path,
                cfg: ReconstructConfig = ReconstructConfig(), info: DataInfo | None = None,
                restart: bool = False, rt: Runtime = Runtime()) -> Path:
    """Write ``cfg.n`` synthetic inputs for ``cfg.objective`` under ``out``; returns the manifest path.

    The inputs are stored in raw data units (the teacher sees them through its normalisation):
    ``info`` (their shape, normalisation and range) comes from the statistics file, or must be given
    without one (noise, bn-stats). The teacher
    is frozen (``requires_grad`` off, eval mode) and its weights are untouched. A set under ``out``
    made with other settings is refused, or with ``restart`` started over. ``rt``: how it runs (progress,
    and this process's share of the shards: ``rank`` of ``world_size``, or torchrun's).
    """
    if cfg.n <= 0 or cfg.batch_size <= 0 or cfg.steps < 0 or cfg.lr <= 0 or min(cfg.jitter, cfg.tv, cfg.l2) < 0:
        raise DfkdError("reconstruct", "n, batch size and lr must be > 0; steps, jitter, tv and l2 >= 0")
    if not (math.isfinite(cfg.ce) and cfg.ce >= 0):
        raise DfkdError("ce", f"the cross-entropy weight must be finite and >= 0 (got {cfg.ce})")
    if cfg.basis not in BASES:
        raise DfkdError("basis", f"{cfg.basis!r} is not one of {', '.join(BASES)}")
    if cfg.views not in SEEN:
        raise DfkdError("views", f"{cfg.views!r} is not {SEEN_FORM}")
    check_seams(cfg.patch_tv, cfg.patch)
    if not cfg.lr * 10 < torch.finfo(torch.float32).max:  # Adam's first step is 10 x lr (its bias correction)
        raise DfkdError("lr", f"{cfg.lr:g} is too large: Adam's first step (10 x lr) does not fit in float32")
    info = meta.data if meta is not None else info
    if info is None:
        raise DfkdError("reconstruct", "without a statistics file, give the data description (info)")
    if cfg.basis == "fourier" and len(info.shape) != 3:
        raise DfkdError("basis", f"the Fourier basis is for images [C, H, W], not inputs of shape {list(info.shape)}")
    if cfg.init not in INITS:
        raise DfkdError("init", f"{cfg.init!r} is not one of {', '.join(INITS)}")
    objective = make_objective(cfg.objective, meta, teacher, cfg)
    # the noise baseline uses no statistics: it never starts from what the file reveals
    start = revealed_means(teacher, meta) if meta is not None and cfg.init != "noise" \
        and not isinstance(objective, Noise) else None
    if start is None and cfg.init == "class-mean" and not isinstance(objective, Noise):
        k = (means_kind(meta.kinds) if meta is not None else None) or "all-layers"  # the kind invert reads
        a = "an" if k[0] in "aeiou" else "a"
        raise DfkdError("init", f"the statistics reveal no class mean inputs (that needs {a} "
                        f"{k} record of a layer affine in the input, of full column rank); use init noise or auto")
    c = meta.num_classes if meta is not None else num_outputs(teacher, info)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_sha = weights_sha256(teacher.state_dict())
    if meta is not None and meta.header["teacher_sha256"] != teacher_sha:
        raise DfkdError(meta.path or "stats", "recorded on another teacher (weights sha256 differs)")
    ranks = distributed.ranks(rt.rank, rt.world_size, rt.device)
    with exclusive(out, folder=True, tag=ranks.tag):  # one run per output folder (and rank); a killed one's lock is void
        synth = SyntheticSet(out)
        done = synth.begin(_manifest_key(cfg, teacher_sha, meta), ranks, restart, objective=cfg.objective,
                           data=info.as_dict(), num_classes=c, n=cfg.n)
        n_batches = -(-cfg.n // cfg.batch_size)
        mine = range(ranks.rank, n_batches, ranks.world)  # shard b is rank b % world's, whatever the split
        optimising = not isinstance(objective, Noise)
        bar = tqdm(total=(len(mine) - sum(1 for b in done if ranks.mine(b))) * (cfg.steps if optimising else 1),
                   desc=f"reconstruct {cfg.objective}" + (f" rank {ranks.rank}/{ranks.world}" if ranks.tag else ""),
                   disable=bars_off(rt.progress), leave=False)
        for b in (b for b in mine if b not in done):  # lazy: n may be huge
            t0 = time.perf_counter()
            size = min(cfg.batch_size, cfg.n - b * cfg.batch_size)
            labels = (torch.arange(size) + b * cfg.batch_size) % c
            g = torch.Generator().manual_seed(_batch_seed(cfg.seed, b))
            x, losses = optimise_batch(teacher, objective, labels, cfg, g, info, bar if optimising else None, start)
            with torch.no_grad():
                logits = at_input(teacher, info)(x.to(device_of(teacher))).float().cpu()
            if not (torch.isfinite(x).all() and torch.isfinite(logits).all()):  # the start or a last step overflowed
                why = "lr" if optimising and cfg.steps else "init_std"
                raise DfkdError(why, f"inputs or their logits became NaN or infinite in batch {b}; finished shards are "
                                f"kept (try a smaller {why}{'' if cfg.clamp else ', or keep the clamp on'})")
            synth.add(b, {"x": x, "label": labels, "logits": logits}, loss_first=losses[0], loss_last=losses[-1],
                      seconds=time.perf_counter() - t0, teacher_agrees=float((logits.argmax(1) == labels).float().mean()))
            if not optimising:
                bar.update(1)
        bar.close()
        fresh = not synth.manifest.get("complete")  # else found complete: its grid is made only if missing
        if synth.finish(n_batches, image_steps=cfg.n * (cfg.steps if optimising else 0)) and len(info.shape) == 3 \
                and (fresh or not (synth.dir / "samples.png").is_file()):
            synth.open()
            parts, k = [], 0  # the first shards, ten inputs a class: never the whole set in memory
            while k < len(synth.manifest["shards"]) and sum(len(p["x"]) for p in parts) < 10 * c:
                parts, k = parts + [synth.shard(k)], k + 1
            x, labels = torch.cat([p["x"] for p in parts]), torch.cat([p["label"] for p in parts])
            save_grid(synth.dir / "samples.png", x, labels, lo=info.low, hi=info.high)
    return synth.manifest_path


def reconstruct_file(teacher: ModelRef, stats: str | None, out: str | Path, cfg: ReconstructConfig,
                     allow_other_teacher: bool = False, restart: bool = False, rt: Runtime = Runtime()) -> Path:
    """``dfkd reconstruct``: a saved teacher and its statistics file (none for noise or bn-stats)."""
    setup_threads()
    model, desc, info = open_model(teacher)
    model.to(pick_device(rt.device))
    meta = load(stats, desc.get("sha256"), allow_other_teacher) if stats else None
    return reconstruct(model, meta, out, cfg, info, restart, rt)
