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
from .taps import resolve, tap


@dataclass(frozen=True)
class LayerInfo:
    path: str
    type: str               # "linear" or "conv"
    shape: tuple[int, ...]  # one sample's output shape
    nodes: int              # graph nodes: units (linear) or channels (conv)
    stat: str = "unit"      # all-layers statistics per "unit" (every output value) or per "channel"
                            # (a conv map's channels, pooled over positions, as BatchNorm keeps them)

    @property
    def dim(self) -> int:
        """The dimension of the layer's all-layers statistics."""
        return self.shape[0] if self.stat == "channel" else math.prod(self.shape)

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerInfo":
        return cls(d["path"], d["type"], tuple(d["shape"]), int(d["nodes"]), d.get("stat", "unit"))


def layer_infos(model: nn.Module, paths: list[str], example: torch.Tensor, conv_stat: str = "channel") -> list[LayerInfo]:
    """Describe ``paths`` in execution order from one forward pass of ``example``; conv layers keep
    their all-layers statistics per ``conv_stat`` ("channel" or "unit")."""
    if conv_stat not in ("channel", "unit"):
        raise DfkdError("conv_stats", f"{conv_stat!r} is not channel or unit")
    mods = resolve(model, paths)
    bad = [p for p, m in mods.items() if not isinstance(m, (nn.Linear, nn.Conv2d))]
    if bad:
        raise DfkdError("layers", f"{', '.join(bad)}: only Linear and Conv2d layers can be recorded")
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def seen(p, out):
        if p not in shapes:
            order.append(p)
            shapes[p] = tuple(out.shape[1:])
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
    if missing:
        raise DfkdError("layers", f"{', '.join(missing)} never ran in a forward pass")
    infos = []
    for p in order:
        shape = shapes[p]
        conv = isinstance(mods[p], nn.Conv2d) and len(shape) == 3
        infos.append(LayerInfo(p, "conv" if conv else "linear", shape, shape[0] if conv else math.prod(shape),
                               conv_stat if conv else "unit"))
    return infos


def layer_signal(out: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """One layer's node signal ``[N, nodes]``."""
    return out.flatten(2).mean(2) if info.type == "conv" else out.flatten(1)


def signal(acts: dict[str, torch.Tensor], infos: list[LayerInfo]) -> torch.Tensor:
    """The concatenated node signal of ``infos`` ``[N, sum(nodes)]``."""
    return torch.cat([layer_signal(acts[i.path], i) for i in infos], 1)


def pair_edges(model: nn.Module, a: LayerInfo, b: LayerInfo) -> torch.Tensor | None:
    """Edge weights ``[a.nodes, b.nodes]`` from ``b``'s weights, or None if they do not connect."""
    m = dict(model.named_modules())[b.path]
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
