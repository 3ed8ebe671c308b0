"""``dfkd reconstruct``: a class-balanced synthetic set from a frozen teacher and its metadata.

Each batch starts from i.i.d. ``N(init_mean, init_std)`` inputs, draws its targets
once, and runs Adam on the inputs only. Batch ``b`` uses a generator seeded from
``(seed, b)`` and is written as ``shard-<b>.safetensors`` (inputs, intended labels,
teacher logits) before ``manifest.json`` lists it, both atomically: an interrupted
run resumes at the first unlisted shard and gives bit-identical shards.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_tensors, read_json, save_tensors, weights_sha256, write_json
from .config import ReconstructConfig, to_dict
from .errors import DfkdError
from .fastgrad import input_grad_by_fold
from .images import save_grid
from .metadata import Metadata
from .models import model_input_shape
from .objectives import AllLayersDropout, make_objective
from .runtime import pick_device, setup_threads
from .taps import tap


def _batch_seed(seed: int, b: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dfkd-reconstruct|{seed}|{b}".encode()).digest()[:8], "little") >> 1


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute difference between neighbouring pixels (an image prior)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def optimise_batch(teacher: nn.Module, objective, labels: torch.Tensor, cfg: ReconstructConfig,
                   g: torch.Generator, bar: tqdm | None = None) -> tuple[torch.Tensor, list[float]]:
    """Optimise one batch of inputs for ``objective``; returns the inputs and [first, last] loss."""
    dev = next(teacher.parameters()).device
    shape = model_input_shape(teacher)
    x = cfg.init_mean + cfg.init_std * torch.randn((len(labels), *shape), generator=g)
    if objective.kind is None or cfg.steps == 0:
        return (x.clamp(0, 1) if cfg.clamp else x), [float("nan"), float("nan")]
    tg = {k: v.to(dev) for k, v in objective.targets(labels, g).items()}
    masks = {k: v.to(dev) for k, v in objective.masks(shape, len(labels), g).items()} \
        if isinstance(objective, AllLayersDropout) else {}
    alter = (lambda p, out: out * masks[p] if p in masks else out) if masks else None
    x = x.to(dev).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    losses = []
    with tap(teacher, objective.layers(), alter=alter) as acts, input_grad_by_fold(teacher, dev.type == "cpu"):
        for step in range(cfg.steps):
            xin = x
            if cfg.jitter:
                dy, dx = (torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=g)).tolist()
                xin = torch.roll(x, (dy, dx), (2, 3))
            logits = teacher(xin * masks["input"] if masks else xin)
            loss = objective.loss(logits, acts, tg).sum()
            if cfg.tv:
                loss = loss + cfg.tv * total_variation(x).sum()
            if not torch.isfinite(loss):
                raise DfkdError("reconstruct", f"loss became {loss.item()} at step {step}; finished shards are kept "
                                "(try a lower --lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.clamp:
                with torch.no_grad():
                    x.clamp_(0, 1)
            if step == 0 or step == cfg.steps - 1:
                losses.append(loss.item() / len(labels))
            if bar is not None:
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{loss.item() / len(labels):.4g}", refresh=False)
    return x.detach().cpu(), losses


def _manifest_key(cfg: ReconstructConfig, teacher_sha: str, meta: Metadata | None) -> dict:
    keep = {k: v for k, v in to_dict(cfg).items() if k not in ("device", "progress")}
    return {"config": keep, "teacher_sha256": teacher_sha,
            "stats_sha256": meta.header.get("tensors_sha256") if meta is not None else None}


def reconstruct(teacher: nn.Module, meta: Metadata | None, out: str | Path,
                cfg: ReconstructConfig = ReconstructConfig()) -> Path:
    """Write ``cfg.n`` synthetic inputs for ``cfg.objective`` under ``out``; returns the manifest path.

    The teacher is frozen (``requires_grad`` off, eval mode) and its weights are untouched.
    """
    out = Path(out)
    if cfg.n <= 0 or cfg.batch_size <= 0 or cfg.steps < 0 or cfg.lr <= 0 or cfg.jitter < 0 or cfg.tv < 0:
        raise DfkdError("reconstruct", "n, batch size and lr must be > 0; steps, jitter and tv >= 0")
    objective = make_objective(cfg.objective, meta, teacher, whiten=cfg.whiten)
    c = meta.num_classes if meta is not None else teacher.num_classes
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_sha = weights_sha256(teacher.state_dict())
    if meta is not None and meta.header["teacher_sha256"] != teacher_sha:
        raise DfkdError(meta.path or "stats", "recorded on another teacher (weights sha256 differs)")
    key = _manifest_key(cfg, teacher_sha, meta)
    mpath = out / "manifest.json"
    manifest = read_json(mpath) if mpath.is_file() else None
    if manifest is not None and {k: manifest.get(k) for k in key} != key:
        raise DfkdError(out, "holds a synthetic set made with other settings or another teacher; "
                        "use another --out or delete it")
    if manifest is None:
        manifest = dict(key, objective=cfg.objective, input_shape=list(model_input_shape(teacher)),
                        num_classes=c, n=cfg.n, shards=[], complete=False)
    done = {s["index"] for s in manifest["shards"] if (out / s["file"]).is_file()}
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] in done]
    n_batches = -(-cfg.n // cfg.batch_size)
    todo = [b for b in range(n_batches) if b not in done]
    bar = tqdm(total=len(todo) * (cfg.steps if objective.kind else 1), desc=f"reconstruct {cfg.objective}",
               disable=not cfg.progress, leave=False)
    for b in todo:
        t0 = time.perf_counter()
        size = min(cfg.batch_size, cfg.n - b * cfg.batch_size)
        labels = (torch.arange(size) + b * cfg.batch_size) % c
        g = torch.Generator().manual_seed(_batch_seed(cfg.seed, b))
        x, losses = optimise_batch(teacher, objective, labels, cfg, g, bar if objective.kind else None)
        with torch.no_grad():
            logits = teacher(x.to(next(teacher.parameters()).device)).float().cpu()
        fname = f"shard-{b:05d}.safetensors"
        save_tensors(out / fname, {"x": x, "label": labels, "logits": logits})
        manifest["shards"].append({"index": b, "file": fname, "n": size, "loss_first": losses[0],
                                   "loss_last": losses[-1], "seconds": time.perf_counter() - t0,
                                   "teacher_agrees": float((logits.argmax(1) == labels).float().mean())})
        manifest["shards"].sort(key=lambda s: s["index"])
        write_json(mpath, manifest)
        if not objective.kind:
            bar.update(1)
    bar.close()
    manifest["complete"] = True
    manifest["image_steps"] = cfg.n * (cfg.steps if objective.kind else 0)
    write_json(mpath, manifest)
    x, labels, _ = load_synthetic(out)
    save_grid(out / "samples.png", x[:, :1] if x.dim() == 4 else x, labels)
    return mpath


def load_synthetic(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All shards of a complete synthetic set: inputs, intended labels, teacher logits."""
    path = Path(path)
    mpath = path / "manifest.json" if path.is_dir() or not path.suffix else path
    manifest = read_json(mpath)
    if not manifest.get("complete"):
        raise DfkdError(mpath, "the synthetic set is incomplete; run dfkd reconstruct again to finish it")
    parts = [load_tensors(mpath.parent / s["file"])[0] for s in manifest["shards"]]
    try:
        return tuple(torch.cat([p[k] for p in parts]) for k in ("x", "label", "logits"))
    except (KeyError, RuntimeError) as e:
        raise DfkdError(mpath, f"shards are inconsistent ({e})") from None


def reconstruct_file(teacher_path: str, stats_path: str | None, out: str, cfg: ReconstructConfig,
                     allow_other_teacher: bool = False) -> Path:
    """``dfkd reconstruct``: load a saved teacher and its statistics file, then reconstruct."""
    from .checkpoint import load_model
    from .metadata import load

    setup_threads()
    teacher, desc = load_model(teacher_path)
    teacher.to(pick_device(cfg.device))
    meta = load(stats_path, desc["sha256"], allow_other_teacher) if stats_path else None
    if meta is not None and allow_other_teacher:
        meta.header["teacher_sha256"] = desc["sha256"]
    return reconstruct(teacher, meta, out, cfg)
