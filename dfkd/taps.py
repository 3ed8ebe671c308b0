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
    """Every Linear and Conv2d path, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, TAPPABLE)]


def resolve(model: nn.Module, paths: list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """Map paths to modules; an unknown path is one line naming the nearest valid ones."""
    mods = dict(model.named_modules())
    out = {}
    for p in paths:
        if p not in mods or p == "":
            near = difflib.get_close_matches(p, [n for n in mods if n], n=3, cutoff=0.3)
            raise DfkdError("--layers", f"no layer {p!r} in the model; nearest: {', '.join(near) or 'none'}")
        out[p] = mods[p]
    return out


@contextmanager
def tap(model: nn.Module, paths: list[str] | tuple[str, ...],
        alter: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``paths``; ``alter(path, out)`` may replace what flows on."""
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make(path: str):
        def hook(_m, _inp, out):
            acts[path] = out
            return alter(path, out) if alter is not None else None
        return hook

    try:
        for p, m in resolve(model, paths).items():
            handles.append(m.register_forward_hook(make(p)))
        yield acts
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, paths: list[str], example: torch.Tensor) -> list[str]:
    """``paths`` sorted by when they run in a forward pass of ``example``; paths that never run are an error."""
    order: list[str] = []
    with tap(model, paths, alter=lambda p, o: order.append(p)):
        with torch.no_grad():
            model(example)
    missing = [p for p in paths if p not in order]
    if missing:
        raise DfkdError("--layers", f"layer(s) {', '.join(missing)} never run in a forward pass")
    seen: list[str] = []
    for p in order:
        if p not in seen:
            seen.append(p)
    return seen
