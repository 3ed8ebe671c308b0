"""Read (and optionally alter) a user's model's layer outputs through forward hooks.

``with tap(model, ["conv1", "fc3"]) as acts: model(x)`` leaves ``acts`` as
``{path: output}``. Hooks are always removed, the model is never rewritten.

``PATH:maps`` names the attention weights of the ``nn.MultiheadAttention`` at ``PATH`` (``[N, L, S]``, averaged
over heads): while tapped, the module is called with ``need_weights=True`` whatever its caller passed, and
its second output is kept. Its first output, the attended values, is the same either way.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import DfkdError

TAPPABLE = (nn.Linear, nn.Conv2d)
MAPS = ":maps"
NEED_WEIGHTS = 4  # need_weights' place among nn.MultiheadAttention.forward's positional arguments


def default_layers(model: nn.Module) -> list[str]:
    """Every Linear and Conv2d path, in registration order; an ``nn.MultiheadAttention`` stands for its
    ``out_proj``, whose weights it applies without calling it (its output is what ``out_proj`` would give)."""
    attention = {name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [name for name, m in model.named_modules()
            if name in attention or (isinstance(m, TAPPABLE) and name.rpartition(".")[0] not in attention)]


def output_of(out):
    """A module's output as a tensor: a tuple's first (``nn.MultiheadAttention``: the attended values)."""
    return out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else out


def picked(path: str, out):
    """What ``tap`` keeps of a module's output: the attention weights for a ``:maps`` path, else ``output_of``."""
    return out[1] if path.endswith(MAPS) else output_of(out)


def resolve(model: nn.Module, paths: list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """Map paths to modules (a ``:maps`` path to its ``nn.MultiheadAttention``); an unknown path is one line
    naming the nearest valid ones."""
    mods = dict(model.named_modules())
    out = {}
    for p in paths:
        name = p.removesuffix(MAPS)
        if name not in mods or name == "":
            near = difflib.get_close_matches(name, [n for n in mods if n], n=3, cutoff=0.3)
            raise DfkdError("layers", f"no layer {p!r} in the model; nearest: {', '.join(near) or 'none'}")
        if p.endswith(MAPS) and not isinstance(mods[name], nn.MultiheadAttention):
            raise DfkdError("layers", f"{p}: {MAPS} names an nn.MultiheadAttention's attention weights, and {name} "
                            f"is a {type(mods[name]).__name__} (a module of the model's own is recorded by its path)")
        out[p] = mods[name]
    return out


def _weights_on(_m, args, kwargs):
    """A forward pre-hook: the attention called with ``need_weights=True``, head-averaged as by default."""
    if len(args) > NEED_WEIGHTS:
        args = (*args[:NEED_WEIGHTS], True, *args[NEED_WEIGHTS + 1:])
    else:
        kwargs = {**kwargs, "need_weights": True}
    return args, kwargs


def input_key(path: str) -> str:
    """The key under which ``tap`` keeps the input of ``path`` (asked for with ``inputs``)."""
    return path + "#input"


@contextmanager
def tap(model: nn.Module, paths: list[str] | tuple[str, ...],
        alter: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        inputs: list[str] | tuple[str, ...] = ()) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``paths`` (a tuple's first tensor: ``output_of``; and the first input of ``inputs``, under ``input_key``);
    ``alter(path, out)`` may replace what flows on."""
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make(path: str, keep_out: bool, keep_in: bool):
        def hook(_m, inp, out):
            if keep_in:
                acts[input_key(path)] = inp[0]
            if keep_out:
                t = acts[path] = picked(path, out)
                if alter is None:
                    return None
                new = alter(path, t)
                if t is out:
                    return new
                if path.endswith(MAPS):
                    return (out[0], new, *out[2:])
                return out._replace(**{out._fields[0]: new}) if hasattr(out, "_fields") else (new, *out[1:])
            return None
        return hook

    try:
        mods = resolve(model, list(dict.fromkeys([*paths, *inputs])))
        for p, m in mods.items():
            if p.endswith(MAPS):
                handles.append(m.register_forward_pre_hook(_weights_on, with_kwargs=True))
            handles.append(m.register_forward_hook(make(p, p in paths, p in inputs)))
        yield acts
    finally:
        for h in handles:
            h.remove()
