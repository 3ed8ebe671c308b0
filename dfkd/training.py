"""Train a network on real data, and the epoch loop that distillation shares.

The loop is resumable at the grain of an epoch: after each one it writes
``state`` (model, optimiser, history; tensors and ints only, loaded with
``weights_only=True``). Each epoch's shuffling and dropout are seeded from
``(seed, epoch)``, so a resumed run equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import io
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .checkpoint import atomic_write, exclusive, save_model
from .config import TrainConfig, to_dict
from .data import DataSource, as_batches, data_len
from .errors import DfkdError
from .evaluation import accuracy
from .models import device_of
from .runtime import pick_device, seed_everything, setup_threads
from .specs import DataRef, ModelRef, open_with_data, require_spec

# batch_loss(model, inputs, targets, generator) -> scalar loss; the generator is the epoch's own
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
# prepare(inputs, targets, generator) -> the epoch's (inputs, targets), given and returned in batch order
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _load_state(path: Path | None, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
    if path is None or not path.is_file():
        return 0, []
    try:
        with warnings.catch_warnings():  # a damaged file's warnings would break the one-line answer
            warnings.simplefilter("ignore")
            st = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        return int(st["epoch"]), list(st["history"])
    except Exception as e:  # any damage: refuse rather than silently restart
        raise DfkdError(path, f"cannot resume from this state file ({type(e).__name__}); delete it to start over") from None


def _save_state(path: Path | None, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, history: list) -> None:
    if path is None:
        return
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": epoch, "history": history}, buf)
    atomic_write(path, buf.getvalue())


def _epoch_chunks(data, order: torch.Tensor | None, batch_size: int, ranks):
    """An epoch's data in chunks of whole batches (``prepare`` sees a chunk at a time), each with
    its batches' sizes. Under DDP a rank reads only its own rows of every global batch."""
    if isinstance(data, DataLoader):
        if ranks.world > 1:
            raise DfkdError("data", "under torchrun give a Dataset or tensors (dfkd splits every batch over the "
                            "ranks), not a DataLoader")
        for xb, yb in as_batches(data, batch_size):
            yield xb, yb, [len(xb)]
        return
    sizes = None
    if ranks.world > 1:
        order, sizes = _share(order, batch_size, ranks)
    else:
        sizes = [len(b) for b in torch.arange(len(order)).split(batch_size)]
    i = k = 0
    while k < len(sizes):
        group = [sizes[k]]
        k += 1
        while k < len(sizes) and sum(group) + sizes[k] <= CHUNK:
            group.append(sizes[k])
            k += 1
        xe, ye = next(as_batches(data, sum(group), order[i:i + sum(group)]))
        yield xe, ye, group
        i += sum(group)


CHUNK = 8192  # inputs gathered (and prepared, e.g. augmented and labelled) at once


def fit(model: nn.Module, data, batch_loss: BatchLoss, *, epochs: int, batch_size: int,
        lr: float, seed: int, schedule: str = "cosine", state_path: Path | None = None,
        on_epoch: Callable[[nn.Module], dict] | None = None, eval_every: int = 1, prepare: Prepare | None = None,
        desc: str = "train", progress: bool = True) -> list[dict]:
    """Adam over ``data`` (a Dataset, a DataLoader or ``(x, y)`` tensors) for ``epochs``; returns one
    dict per epoch (loss, seconds, and ``on_epoch``'s). Only a chunk of the data is in memory.

    Each epoch's order is a seeded permutation (or the dataset's own ``epoch_order``, or the
    DataLoader's). ``on_epoch`` runs after every ``eval_every``-th epoch and after the last.
    ``prepare`` may rewrite each chunk before its steps (distillation augments it and lets
    the teacher label it in large, efficient batches).

    ``schedule="cosine"`` anneals the learning rate from ``lr`` to 0 over the run (per step), which
    makes the last epoch's model the stable one to keep; ``"constant"`` keeps ``lr``."""
    if schedule not in ("cosine", "constant"):
        raise DfkdError("schedule", f"{schedule!r} is not cosine or constant")
    dev = device_of(model)
    ranks = distributed.current()
    net = model if ranks.world == 1 else DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    # the fused kernel: one pass over all parameters per step (Hinton-1200 steps ~30% faster on CPU)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    start, history = _load_state(state_path, model, opt)
    n = data_len(data)
    steps_per_epoch = -(-n // batch_size)
    progress = progress and ranks.main
    for epoch in range(start, epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # the epoch's order: the same on every rank
        torch.manual_seed(seed * 1_000_003 + epoch + 7919 * ranks.rank)
        if ranks.world > 1:  # each rank's own draws for augmentation and dropout
            g_rank = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7919 * ranks.rank)
        t0, total, j = time.perf_counter(), 0.0, 0
        order = None if isinstance(data, DataLoader) else \
            data.epoch_order(g) if hasattr(data, "epoch_order") else torch.randperm(n, generator=g)
        model.train()
        bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        gb = g if ranks.world == 1 else g_rank
        for xe, ye, sizes in _epoch_chunks(data, order, batch_size, ranks):
            if prepare is not None:
                xe, ye = prepare(xe, ye, gb)
            for xb, yb in _batches(xe, ye, sizes):
                if schedule == "cosine":  # a function of the global step, so resuming keeps it exact
                    t = (epoch * steps_per_epoch + j) / (epochs * steps_per_epoch)
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * t))
                loss = batch_loss(net, xb.to(dev), yb.to(dev), gb)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # under DDP the gradients are averaged over the ranks here
                opt.step()
                total += loss.item() * len(xb)
                j += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
        rec = {"epoch": epoch + 1, "loss": total / max(n, 1) * ranks.world, "seconds": time.perf_counter() - t0}
        if on_epoch is not None and ranks.main and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            rec.update(on_epoch(model))
        history.append(rec)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in rec.items() if k != "epoch"))
        if ranks.main:
            _save_state(state_path, model, opt, epoch + 1, history)
    model.eval()
    return history


def _share(order: torch.Tensor, batch_size: int, ranks) -> tuple[torch.Tensor, list[int]]:
    """This rank's indices of every global batch in ``order`` (``tensor_split`` of each batch over
    the ranks) and the sizes of its local batches. A last global batch smaller than the world is
    dropped, so that every rank takes the same number of steps."""
    rows, sizes = [], []
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        if len(batch) >= ranks.world:
            part = torch.tensor_split(batch, ranks.world)[ranks.rank]
            rows.append(part)
            sizes.append(len(part))
    return (torch.cat(rows) if rows else order[:0]), sizes


def _batches(x: torch.Tensor, y: torch.Tensor, sizes: list[int]):
    i = 0
    for k in sizes:
        yield x[i:i + k], y[i:i + k]
        i += k


def train(model: nn.Module, data, cfg: TrainConfig = TrainConfig(), test=None,
          state_path: Path | None = None) -> list[dict]:
    """Train any ``nn.Module`` with cross-entropy on ``data``: a ``DataSource`` (its training split,
    and its test split for the per-epoch test accuracy), or a Dataset, DataLoader or ``(x, y)``
    tensors with an optional ``test`` set of the same kind."""
    if isinstance(data, DataSource):
        data, test = data.train, test if test is not None else data.test
    on_epoch = (lambda m: {"test_accuracy": accuracy(m, test)}) if test is not None else None
    return fit(model, data, cross_entropy_loss, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
               seed=cfg.seed, schedule=cfg.schedule, state_path=state_path, on_epoch=on_epoch,
               desc="train", progress=cfg.progress)


def train_file(model: ModelRef, data: DataRef, out: str | Path, cfg: TrainConfig = TrainConfig()) -> Path:
    """``dfkd train``: a model spec trained on a data spec, saved atomically as ``out`` (a file stem,
    e.g. ``runs/mnist/teacher``); resumes from ``<out>.state.pt`` after an interruption."""
    require_spec(model, "model")
    setup_threads()
    ranks = distributed.group(cfg.device)  # under torchrun: data-parallel, rank 0 writes
    seed_everything(cfg.seed)
    net, desc, source = open_with_data(model, data)
    net.to(pick_device(cfg.device))
    with exclusive(Path(out), tag=ranks.tag):
        out = Path(out)
        history = train(net, source, cfg, state_path=out.with_name(out.name + ".state.pt"))
        if ranks.main:
            extra = {"test_accuracy": history[-1]["test_accuracy"]} if "test_accuracy" in history[-1] else {}
            save_model(net.cpu(), out, desc["model"]["spec"], desc["model"]["args"], source.info, history=history,
                       train_config=to_dict(cfg), **extra)
            out.with_name(out.name + ".state.pt").unlink(missing_ok=True)
        ranks.barrier()
        return out.with_name(out.name + ".safetensors")
