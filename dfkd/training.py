"""Train a network on real data with cross-entropy, on the epoch loop distillation shares (``loop``):
resumable at the grain of an epoch, a resumed run equal to an uninterrupted one bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import save_model
from .config import Runtime, TrainConfig, to_dict
from .data import DataInfo, DataSource, at_input, data_len, info_of
from .errors import DfkdError
from .files import exclusive, weights_sha256
from .loop import accuracy, fit
from .models import train_logits
from .resume import canonical, check_finished, config_settings
from .resume import state_path as state_file
from .runtime import pick_device, seed_everything, setup_threads, whole
from .sources import data_sha256
from .specs import DataRef, ModelRef, open_with_data, require_spec
from .views import SEEN, SEEN_FORM, augment


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
    return F.cross_entropy(train_logits(model, x), y)


def check_augment(how: str, shape: tuple[int, ...] | None = None) -> None:
    """``how`` is a view ``train`` takes (``views.SEEN``), and inputs of ``shape`` (one input's, where known) are
    images, which views need."""
    if how not in SEEN:
        raise DfkdError("augment", f"{how!r} is not {SEEN_FORM}")
    if how != "none" and shape is not None and len(shape) != 3:
        raise DfkdError("augment", f"views need images [C, H, W]; these inputs are {tuple(shape)}")


def augmented_loss(how: str, info: DataInfo | None):
    """``cross_entropy_loss`` on each batch's ``how`` views (``views.SEEN``: nothing mixed, so each view keeps
    its label), drawn from the epoch's generator within the raw range of ``info`` (else the batch's own)."""
    check_augment(how, info.shape if info is not None else None)
    if how == "none":
        return cross_entropy_loss

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if info is None:  # plain tensors: checked, and their range read, batch by batch
            check_augment(how, tuple(x.shape[1:]))
            return F.cross_entropy(train_logits(model, augment(x, how, g, lo=float(x.min()), hi=float(x.max()))), y)
        return F.cross_entropy(train_logits(model, augment(x, how, g, lo=info.low, hi=info.high)), y)
    return loss


def train(model: nn.Module, data, cfg: TrainConfig = TrainConfig(), test=None,
          state_path: Path | None = None, settings: dict | None = None, restart: bool = False,
          rt: Runtime = Runtime()) -> list[dict]:
    """Train any ``nn.Module`` with cross-entropy on ``data``: a ``DataSource`` (its training split,
    and its test split for the per-epoch test accuracy), or a Dataset, DataLoader or ``(x, y)``
    tensors with an optional ``test`` set of the same kind. ``state_path``, ``settings`` and
    ``restart``: resume as ``fit`` does. ``rt``: how it runs (progress; the model stays on its device)."""
    whole(rt, "train")
    info = data.info if isinstance(data, DataSource) else info_of(data)
    if isinstance(data, DataSource):
        data, test = data.train, test if test is not None else data.test
    test_info = None if info_of(test) is not None else info  # a test set without its own description: info's
    on_epoch = (lambda m: {"test_accuracy": accuracy(at_input(m, test_info), test)}) if test is not None else None
    return fit(model, data, augmented_loss(cfg.augment, info), info=info, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
               seed=cfg.seed, schedule=cfg.schedule, state_path=state_path, on_epoch=on_epoch,
               desc="train", progress=rt.progress, settings=settings, restart=restart)


def data_settings(source: DataSource, test: str | None = None) -> dict:
    """A data source as settings: its description (normalisation, shape, classes; not its name,
    which holds a path), the splits' sizes and the sha256 of the content of the training data and
    of the ``test`` spec's (every file's bytes: a file changed in place differs, a moved copy does
    not)."""
    info = {k: v for k, v in source.info.as_dict().items() if k != "name"}
    return {"info": info, "content_sha256": data_sha256(source.info.name), "test_sha256": data_sha256(test),
            "rows": [data_len(s) if s is not None else None for s in (source.train, source.test)]}


def train_file(model: ModelRef, data: DataRef, out: str | Path, cfg: TrainConfig = TrainConfig(),
               restart: bool = False, rt: Runtime = Runtime()) -> Path:
    """``dfkd train``: a model spec trained on a data spec, saved atomically as ``out`` (a file stem,
    e.g. ``runs/mnist/teacher``); resumes from ``<out>.state.safetensors`` after an interruption.
    A resume state or a finished model made with other settings (data, model and its starting
    weights, hyperparameters, seed) is refused, or with ``restart`` started over; a finished model
    made with the same settings is kept (nothing to do)."""
    require_spec(model, "model")
    check_augment(cfg.augment)
    setup_threads()
    ranks = distributed.group(rt.device)  # under torchrun: data-parallel, rank 0 writes
    seed_everything(cfg.seed)
    net, desc, source = open_with_data(model, data)
    check_augment(cfg.augment, source.info.shape)
    settings = {"verb": "train", "model": desc["model"], "start_sha256": weights_sha256(net.state_dict()),
                "data": data_settings(source, data.test), "config": config_settings(cfg)}
    net.to(pick_device(rt.device))
    with exclusive(Path(out), tag=ranks.tag):
        out = Path(out)
        if not check_finished(out, settings, restart):  # else made before with these settings: kept
            history = train(net, source, cfg, state_path=state_file(out), settings=settings, restart=restart, rt=rt)
            if ranks.main:
                extra = {"test_accuracy": history[-1]["test_accuracy"]} if "test_accuracy" in history[-1] else {}
                save_model(net.cpu(), out, desc["model"]["spec"], desc["model"]["args"], source.info,
                           origin=source.origin, history=history, train_config=to_dict(cfg), settings=canonical(settings), **extra)
        if ranks.main:
            state_file(out).unlink(missing_ok=True)
        ranks.barrier()
        return out.with_name(out.name + ".safetensors")
