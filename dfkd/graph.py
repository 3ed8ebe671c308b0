"""The network as a graph: which layers, how many nodes each, the weights between them,
and the activation signal on its nodes.

Nodes. A Linear layer contributes one node per output unit; a Conv2d layer one node per
output channel, whose signal is that channel's spatial mean pre-activation
``s_c = mean_{h,w} z[c, h, w]``. Per-channel nodes keep the graph small (LeNet-5: 236
nodes, a per-unit graph would have 6,518) and make it defined for any CNN, whatever
its spatial sizes or pooling.

Edges. Between layers ``a`` and ``b`` adjacent in execution order, with ``b``'s weight
``W`` (``[out, in]`` or ``[out, in, kh, kw]``), the edge between node ``i`` of ``a``
and node ``j`` of ``b`` is ``sum |W[j, i, ...]|`` (the kernel's L1 norm). A Linear
layer after a flatten of ``n_a`` channels groups its ``in`` inputs in ``n_a``
contiguous blocks (PyTorch's channel-major flatten). Where ``b``'s inputs do not
match ``a``'s nodes (a residual join, a grouped conv, a reshaped tensor) the pair gets
no edges and the two layers are separate components of the graph.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import DfkdError
from .stats import block_adjacency, fourier_basis
from .taps import maps_paths, resolve, tap


# modules whose output keeps its features on the last axis (tokens ``[T, D]``, a channels-last map ``[H, W, C]``),
# and those that keep them on the first (a conv map ``[C, H, W]``, a sequence ``[C, L]``); any other module's
# output is tokens when it has two dimensions per example, a map (channels first) when it has more
FEATURES_LAST = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)
CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.pooling._MaxPoolNd,
                  nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                  nn.modules.pooling._AdaptiveMaxPoolNd)


@dataclass(frozen=True)
class LayerInfo:
    path: str
    type: str               # "linear" (a vector), "conv" (a map, channels first) or "token" (features last)
    shape: tuple[int, ...]  # one sample's output shape
    nodes: int              # graph nodes: units (linear), channels (conv) or features (token)
    stat: str = "unit"      # all-layers statistics per "unit" (every output value), per "channel" (a conv map's
                            # channels pooled over positions, as BatchNorm keeps them) or per "feature" (a token
                            # sequence's features pooled over tokens, as LayerNorm sees them)

    @property
    def pooled(self) -> bool:
        """Whether every position (token) of a sample is a draw of the layer's statistics."""
        return self.stat != "unit"

    @property
    def dim(self) -> int:
        """The dimension of the layer's all-layers statistics."""
        return {"channel": self.shape[0], "feature": self.shape[-1]}.get(self.stat, math.prod(self.shape))

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerInfo":
        return cls(d["path"], d["type"], tuple(d["shape"]), int(d["nodes"]), d.get("stat", "unit"))


def _type(m: nn.Module, shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return "linear"
    if isinstance(m, FEATURES_LAST) or (len(shape) == 2 and not isinstance(m, CHANNELS_FIRST)):
        return "token"
    return "conv"


def layer_infos(model: nn.Module, paths: list[str], example: torch.Tensor, conv_stat: str = "channel",
                token_stat: str = "feature", first: str = "pooled", named: bool = True) -> list[LayerInfo]:
    """Describe ``paths`` in execution order from one forward pass of ``example``: conv maps keep their
    all-layers statistics per ``conv_stat`` ("channel" or "unit"), token sequences per ``token_stat``
    ("feature" or "unit"), except the first layer where ``first`` is "unit" (per unit: the layer the input
    reaches first, whose class means follow the inputs'). Any module whose output is a tensor (or a tuple
    led by one) can be recorded. A path that never runs is refused where ``named`` (the user named it), else
    left out (a default layer of an auxiliary head)."""
    if conv_stat not in ("channel", "unit"):
        raise DfkdError("conv_stats", f"{conv_stat!r} is not channel or unit")
    if token_stat not in ("feature", "unit"):
        raise DfkdError("token_stats", f"{token_stat!r} is not feature or unit")
    mods = resolve(model, paths)
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    bad: list[str] = []

    def seen(p, out):
        if p not in shapes:
            order.append(p)
            ok = isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 2 and \
                len(out) == len(example)
            shapes[p] = tuple(out.shape[1:]) if ok else ()
            if not ok:
                bad.append(p)
        return out

    was = model.training
    model.eval()
    try:
        with tap(model, paths, alter=seen), torch.no_grad():
            model(example)
    except RuntimeError as e:
        raise DfkdError("data", f"inputs of shape {tuple(example.shape[1:])} do not fit the model: "
                        f"{str(e).splitlines()[0]}") from None
    finally:
        model.train(was)
    missing = [p for p in paths if p not in shapes]
    if missing and not named:
        paths, missing = [p for p in paths if p in shapes], []
    if missing:
        why = [f" ({p.rpartition('.')[0]} is an nn.MultiheadAttention, which applies {p}'s weights without "
               f"calling it: record {p.rpartition('.')[0]} instead, or {p.rpartition('.')[0]}:maps for its attention weights)" for p in missing
               if isinstance(dict(model.named_modules()).get(p.rpartition(".")[0]), nn.MultiheadAttention)]
        raise DfkdError("layers", f"{', '.join(missing)} never ran in a forward pass{''.join(why[:1])}")
    if bad:
        mha = any(isinstance(mods[p], nn.MultiheadAttention) for p in set(bad) - maps_paths(model, bad))
        raise DfkdError("layers", f"{', '.join(bad)}: the output is not a float tensor with one row per input"
                        + (" (an nn.MultiheadAttention needs batch_first=True)" if mha else ""))
    infos = []
    for p in order:
        shape = shapes[p]
        kind = _type(mods[p], shape)
        nodes = {"conv": shape[0], "token": shape[-1]}.get(kind, math.prod(shape))
        stat = "unit" if first == "unit" and not infos else {"conv": conv_stat, "token": token_stat}.get(kind, "unit")
        infos.append(LayerInfo(p, kind, shape, nodes, stat))
    return infos


TYPE_STATS = {"linear": ("unit",), "conv": ("unit", "channel"), "token": ("unit", "feature")}  # what each type allows


def positions(out: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """A map's or a sequence's values per node and position, ``[N, nodes, P]``: a conv map's channels over
    its positions, a token sequence's features over its tokens."""
    return out.flatten(2) if info.type == "conv" else out.flatten(1, -2).transpose(1, 2)


def layer_rows(out: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """A layer's output as its record's rows: ``[N, D]``, or ``[N, D, P]`` where the statistics pool positions."""
    return positions(out, info) if info.pooled else out.flatten(1)


def layer_signal(out: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """One layer's node signal ``[N, nodes]``: a map's or a sequence's nodes averaged over their positions."""
    return out.flatten(1) if info.type == "linear" else positions(out, info).mean(2)


def signal(acts: dict[str, torch.Tensor], infos: list[LayerInfo]) -> torch.Tensor:
    """The concatenated node signal of ``infos`` ``[N, sum(nodes)]``."""
    return torch.cat([layer_signal(acts[i.path], i) for i in infos], 1)


def pair_edges(model: nn.Module, a: LayerInfo, b: LayerInfo) -> torch.Tensor | None:
    """Edge weights ``[a.nodes, b.nodes]`` from ``b``'s weights, or None if they do not connect."""
    m = dict(model.named_modules()).get(b.path)  # None for an attention's weights (``PATH:maps``)
    if not isinstance(m, (nn.Linear, nn.Conv2d)) or maps_paths(model, [a.path]):
        # no weight matrix between the two (an attention's weights, whose nodes are key tokens, feed no layer):
        return None  # separate components
    w = m.weight.detach().abs().to(torch.float64).cpu()
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.in_channels != a.nodes:
            return None
        return w.sum((2, 3)).T
    if m.in_features == a.nodes:
        return w.T
    if m.in_features % a.nodes == 0:
        return w.view(m.out_features, a.nodes, -1).sum(2).T
    return None


def chain_basis(model: nn.Module, infos: list[LayerInfo]) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplacian eigenpairs of the graph over ``infos`` (adjacent pairs connected)."""
    edges = {}
    for k in range(len(infos) - 1):
        e = pair_edges(model, infos[k], infos[k + 1])
        if e is not None:
            edges[(k, k + 1)] = e
    return fourier_basis(block_adjacency([i.nodes for i in infos], edges))
