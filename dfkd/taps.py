"""Read (and optionally alter) a user's model's layer outputs through forward hooks.

``with tap(model, ["conv1", "fc3"]) as acts: model(x)`` leaves ``acts`` as
``{path: output}``. Hooks are always removed, the model is never rewritten.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import DfkdError

TAPPABLE = (nn.Linear, nn.Conv2d)


def default_layers(model: nn.Module) -> list[str]:
    """Every Linear and Conv2d path, in registration order; an ``nn.MultiheadAttention`` stands for its
    ``out_proj``, whose weights it applies without calling it (its output is what ``out_proj`` would give)."""
    attention = {name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [name for name, m in model.named_modules()
            if name in attention or (isinstance(m, TAPPABLE) and name.rpartition(".")[0] not in attention)]


def output_of(out):
    """A module's output as a tensor: a tuple's first (``nn.MultiheadAttention``: the attended values)."""
    return out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else out


def resolve(model: nn.Module, paths: list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """Map paths to modules; an unknown path is one line naming the nearest valid ones."""
    mods = dict(model.named_modules())
    out = {}
    for p in paths:
        if p not in mods or p == "":
            near = difflib.get_close_matches(p, [n for n in mods if n], n=3, cutoff=0.3)
            raise DfkdError("layers", f"no layer {p!r} in the model; nearest: {', '.join(near) or 'none'}")
        out[p] = mods[p]
    return out


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
                t = acts[path] = output_of(out)
                if alter is None:
                    return None
                new = alter(path, t)
                if t is out:
                    return new
                return out._replace(**{out._fields[0]: new}) if hasattr(out, "_fields") else (new, *out[1:])
            return None
        return hook

    try:
        mods = resolve(model, list(dict.fromkeys([*paths, *inputs])))
        for p, m in mods.items():
            handles.append(m.register_forward_hook(make(p, p in paths, p in inputs)))
        yield acts
    finally:
        for h in handles:
            h.remove()
