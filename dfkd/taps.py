"""Read (and optionally alter) a user's model's layer outputs through forward hooks.

``with tap(model, ["conv1", "fc3"]) as acts: model(x)`` leaves ``acts`` as
``{path: output}``. Hooks are always removed, the model is never rewritten.

``PATH:maps`` names the attention weights of the ``nn.MultiheadAttention`` at ``PATH`` (``[N, L, S]``: queries by
keys, averaged over heads where the caller asked for them per head): while tapped, the module is called with
``need_weights=True`` whatever its caller passed, and its second output is kept, read only (an ``alter`` sees it,
but what flows on is the module's own). Its first output, the attended values, is the same up to float rounding
(torch computes them by another path when it also returns the weights). A path that names a module is that
module, even one whose name ends in ``:maps``.
"""
from __future__ import annotations

import difflib
import inspect
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


def maps_paths(model: nn.Module, paths) -> set[str]:
    """The ``PATH:maps`` among ``paths``: those ending so that name no module of the model."""
    names = {n for n, _ in model.named_modules()}
    return {p for p in paths if p.endswith(MAPS) and p not in names}


def attention_maps(path: str, out) -> torch.Tensor:
    """An nn.MultiheadAttention's weights from its output ``(values, weights)``, ``[N, L, S]`` (a per-head
    ``[N, H, L, S]`` averaged over heads); one line where the module gave none."""
    w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    if not isinstance(w, torch.Tensor) or w.dim() not in (3, 4):
        raise DfkdError("layers", f"{path}: the module returned no attention weights [N, L, S] with "
                        "need_weights=True (a forward of its own?)")
    return w.mean(1) if w.dim() == 4 else w


def resolve(model: nn.Module, paths: list[str] | tuple[str, ...], maps: set[str] | None = None) -> dict[str, nn.Module]:
    """Map paths to modules (a ``:maps`` path to its ``nn.MultiheadAttention``; ``maps``: ``maps_paths`` where the
    caller has it); an unknown path is one line naming the nearest valid ones."""
    mods = dict(model.named_modules())
    maps = maps_paths(model, paths) if maps is None else maps
    out = {}
    for p in paths:
        name = p.removesuffix(MAPS) if p in maps else p
        if name not in mods or name == "":
            near = difflib.get_close_matches(name, [n for n in mods if n], n=3, cutoff=0.3)
            raise DfkdError("layers", f"no layer {p!r} in the model; nearest: {', '.join(near) or 'none'}")
        if p in maps and not isinstance(mods[name], nn.MultiheadAttention):
            raise DfkdError("layers", f"{p}: {MAPS} names an nn.MultiheadAttention's attention weights, and {name} "
                            f"is a {type(mods[name]).__name__} (a module of the model's own is recorded by its path)")
        if p in maps and "need_weights" not in inspect.signature(mods[name].forward).parameters:
            raise DfkdError("layers", f"{p}: {name}'s forward takes no need_weights (a forward of its own), so its "
                            "attention weights cannot be asked for")
        out[p] = mods[name]
    return out


def _weights_on(_m, args, kwargs):
    """A forward pre-hook: the attention called with ``need_weights=True`` (per head or averaged, as its caller asks)."""
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
    """Record the outputs of ``paths`` (a tuple's first tensor: ``output_of``; a ``PATH:maps``'s attention weights;
    and the first input of ``inputs``, under ``input_key``); ``alter(path, out)`` may replace what flows on (not
    the attention weights: it sees them only)."""
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make(path: str, keep_out: bool, keep_in: bool, maps: bool):
        def hook(_m, inp, out):
            if keep_in:
                acts[input_key(path)] = inp[0]
            if maps:
                acts[path] = attention_maps(path, out)
                if alter is not None:
                    alter(path, acts[path])  # seen, not passed on: the weights are the module's own
            elif keep_out:
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
        maps = maps_paths(model, paths)
        mods = resolve(model, list(dict.fromkeys([*paths, *inputs])), maps)
        for p, m in mods.items():
            if p in maps:
                handles.append(m.register_forward_pre_hook(_weights_on, with_kwargs=True))
            handles.append(m.register_forward_hook(make(p, p in paths, p in inputs, p in maps)))
        yield acts
    finally:
        for h in handles:
            h.remove()
