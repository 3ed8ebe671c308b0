"""The epoch loop that training and distillation share, and the test accuracy they log.

The loop is resumable at the grain of an epoch: after each one it writes
``state`` (model, optimiser, history and the run's settings, safetensors bound to a sha256:
``resume``); a damaged state or one of other settings is refused. Each epoch's shuffling and
dropout are seeded from ``(seed, epoch)``, so a resumed run equals an uninterrupted one bit for
bit. A non-finite loss or weights stop the run before anything of that epoch is saved.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .averaging import Average
from .data import DataInfo, as_batches, at_input, data_len, info_of
from .errors import DfkdError
from .models import device_of
from .resume import canonical, load_state, save_state
from .runtime import bars_off

# batch_loss(model, inputs, targets, generator) -> scalar loss; the generator is the epoch's own
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
# prepare(inputs, targets, generator) -> the epoch's (inputs, targets), given and returned in batch order
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _diverged(what: str, epoch: int, state_path: Path | None) -> DfkdError:
    """The one line for a loss or weights gone non-finite in (0-based) ``epoch``: nothing of it is saved."""
    kept = state_path is not None and epoch > 0
    return DfkdError("lr", f"{what}; nothing was saved" + (f" after epoch {epoch}, whose resume state is kept" if kept
                     else "") + f" (try a smaller --lr{', with --restart' if kept else ''})")


def _finite(model: nn.Module) -> bool:
    flags = [torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


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


def tested(epoch: int, epochs: int, eval_every: int) -> bool:
    """Whether ``fit`` measures the model after (1-based) ``epoch``: every ``eval_every``-th and the last."""
    return epoch % eval_every == 0 or epoch == epochs


def nonfinite(loss: torch.Tensor, ranks=None) -> str | None:
    """``"NaN"`` or ``"infinite"`` if the loss of this step is so on any rank (NaN first), else None.
    Under a process group every rank takes part (one all-reduce of two flags), so that all ranks stop
    at the same step with the same words instead of one raising while the others wait."""
    loss = loss.detach().float().reshape(())
    flags = torch.stack([torch.isnan(loss), torch.isinf(loss)]).float()
    if ranks is not None and ranks.group and ranks.world > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    nan, inf = flags.tolist()
    return "NaN" if nan else "infinite" if inf else None


CHUNK = 8192  # inputs gathered (and prepared, e.g. augmented and labelled) at once


def fit(model: nn.Module, data, batch_loss: BatchLoss, *, info: DataInfo | None = None, epochs: int, batch_size: int,
        lr: float, seed: int, schedule: str = "cosine", state_path: Path | None = None,
        on_epoch: Callable[[nn.Module], dict] | None = None, eval_every: int = 1, prepare: Prepare | None = None,
        desc: str = "train", progress: bool = True, settings: dict | None = None,
        restart: bool = False, average: float = 0.0) -> list[dict]:
    """Adam over ``data`` (a Dataset, a DataLoader or ``(x, y)`` tensors) for ``epochs``; returns one
    dict per epoch (loss, seconds of training, wall: with its test, and ``on_epoch``'s), a resumed run's
    restored epochs first. Only a chunk of the data is in memory. The data are
    raw inputs: ``batch_loss`` gets the model behind ``info``'s normalisation (``data.at_input``); the
    optimiser, the resume state and ``on_epoch`` get ``model`` itself.

    Each epoch's order is a seeded permutation (or the dataset's own ``epoch_order``, or the
    DataLoader's). ``on_epoch`` runs after every ``eval_every``-th epoch and after the last.
    ``prepare`` may rewrite each chunk before its steps (distillation augments it and lets
    the teacher label it in large, efficient batches).

    ``schedule="cosine"`` anneals the learning rate from ``lr`` to 0 over the run (per step), which
    makes the last epoch's model the stable one to keep; ``"constant"`` keeps ``lr``.

    ``state_path``: the resume state, written after every epoch with the run's ``settings`` (these
    arguments, plus the caller's: data, model, ...); one damaged or of other settings is refused,
    or with ``restart`` ignored. A non-finite loss or weights stop the run (``DfkdError`` on
    ``lr``) before anything of that epoch is saved.

    ``average`` (a share of the epochs, in [0, 1)): the model kept is the mean of the weights after each of the
    last ``average * epochs`` epochs (rounded half up; at least two), its BatchNorm statistics computed again over
    the last epoch's first chunk of views, in its batches (``averaging``); while it is being made, the logged
    ``test_accuracy`` is the average's and ``running_test_accuracy`` the weights' own. The average travels in the resume state."""
    if schedule not in ("cosine", "constant"):
        raise DfkdError("schedule", f"{schedule!r} is not cosine or constant")
    dev = device_of(model)
    ranks = distributed.current()
    net = at_input(model, info)
    net = net if ranks.world == 1 else DistributedDataParallel(net, device_ids=[dev] if dev.type == "cuda" else None)
    # the fused kernel: one pass over all parameters per step (Hinton-1200 steps ~30% faster on CPU)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    n = data_len(data)
    settings = canonical({"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "schedule": schedule,
                          "eval_every": eval_every, "examples": n, **({"average": average} if average else {}),
                          **(settings or {})})
    mean = Average(model, average, epochs) if average else None
    start, history = load_state(state_path, model, opt, settings, restart, average=mean)
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
        bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", disable=bars_off(progress), leave=False)
        gb = g if ranks.world == 1 else g_rank
        measure = on_epoch is not None and ranks.main and tested(epoch + 1, epochs, eval_every)
        averaged, views = mean is not None and mean.active(epoch), None
        refresh = averaged and (measure or epoch + 1 == epochs)  # the average measured or kept after this epoch
        for xe, ye, sizes in _epoch_chunks(data, order, batch_size, ranks):
            if prepare is not None:
                xe, ye = prepare(xe, ye, gb)
            if refresh and views is None:  # the first chunk as its steps see it: the average's BatchNorm statistics
                views = (xe, sizes)
            for xb, yb in _batches(xe, ye, sizes):
                if schedule == "cosine":  # a function of the global step, so resuming keeps it exact
                    t = (epoch * steps_per_epoch + j) / (epochs * steps_per_epoch)
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * t))
                loss = batch_loss(net, xb.to(dev), yb.to(dev), gb)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # under DDP the gradients are averaged over the ranks here
                opt.step()
                value = loss.item()
                bad = nonfinite(loss, ranks)
                if bad:
                    bar.close()
                    raise _diverged(f"the loss became {bad} at epoch {epoch + 1}, step {j + 1}", epoch, state_path)
                total += value * len(xb)
                j += 1
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        bar.close()
        if not _finite(model):  # a last step can overflow the weights with a finite loss
            raise _diverged(f"the weights became NaN or infinite in epoch {epoch + 1}", epoch, state_path)
        rec = {"epoch": epoch + 1, "loss": total / max(n, 1) * ranks.world, "seconds": time.perf_counter() - t0}
        if averaged:
            mean.update(model)
        if refresh:
            kept = mean.refresh(*views, info, dev)
            if measure:
                rec.update({f"running_{k}": v for k, v in on_epoch(model).items()}, **on_epoch(kept))
        elif measure:
            rec.update(on_epoch(model))
        rec["wall"] = time.perf_counter() - t0  # the epoch with its test: a resumed stage's time sums these
        history.append(rec)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in rec.items() if k != "epoch"))
        if ranks.main and state_path is not None:
            save_state(state_path, model, opt, epoch + 1, history, settings, average=mean)
    if mean is not None and mean.count:  # the model kept: the average (its statistics refreshed after the last epoch)
        model.load_state_dict(mean.mean.module.state_dict())
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


@torch.no_grad()
def predictions(model: nn.Module, data, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and true labels over ``data`` (a Dataset, DataLoader or ``(x, y)``), streamed; a
    split that carries its ``DataInfo`` (a ``DataSource``'s) is raw, and the model sees it normalised."""
    was = model.training
    model.eval()
    dev, net = device_of(model), at_input(model, info_of(data))
    preds, labels = [], []
    for xb, yb in as_batches(data, batch_size):
        preds.append(net(xb.to(dev)).argmax(1).cpu())
        labels.append(torch.as_tensor(yb).cpu())
    model.train(was)
    if not preds:
        raise DfkdError("data", "the test split holds no examples")
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, data) -> float:
    """Fraction of ``data`` whose argmax logit equals the true label."""
    pred, y = predictions(model, data)
    return (pred == y).float().mean().item()
