"""What a statistics file gives in closed form: the class-mean inputs behind a record of the layers'
class means (``kinds.means_kind``: all-layers, else class-diag; any kind whose entry says ``layer_means``), and
behind a token-positions record (a pooled token layer's class means at every position).

Such a record (all-layers or class-diag) of a layer that the input reaches through affine maps only (a first
Linear or Conv2d, after a flatten or the normalisation) stores each class's mean of
``s(x) = J x + s0``. Since ``E[s | c] = J E[x | c] + s0``, the least-squares solution
``J^+ (m_c - s0)`` is each class's *mean training input*, exactly when ``J`` has full column
rank (a 784->1200 Linear; a per-unit conv record), and its projection onto the row space of
``J`` when not (a per-channel conv record: one number per channel). A full covariance record
gives the class covariance of the inputs the same way, a diagonal one only its projections.

``invert`` finds such layers (``J`` is read column by column from the model, and affinity is
checked numerically); ``reveals`` states what follows, as ``record`` writes it into the header;
``revealed_means`` gives the exact class means where there are (reconstruction's ``class-mean`` start).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .graph import LayerInfo, layer_rows
from .kinds import REGISTRY, means_kind, positions
from .metadata import Metadata
from .taps import tap

MAX_INPUT_DIM = 16384  # inputs larger than this are not inverted column by column


@dataclass
class Inversion:
    layer: str
    stat: str          # "unit", "channel", "feature" or "position" (a token-positions record: per (token, feature))
    rank: int          # rank of J: equal to the input dimension means the means are exact
    input_dim: int
    cov: str           # the layer's stored covariance: full (class covariances follow too), diag, lowrank
    means: torch.Tensor  # [C, *shape], raw units


class _Reached(Exception):
    """Raised by the hook once the tapped layer has run its last call: nothing after it is needed."""


def _stat(model: nn.Module, info: LayerInfo, x: torch.Tensor, calls: int = 0) -> tuple[torch.Tensor, int]:
    """The record's statistic of ``path`` for ``x`` as ``tap`` sees it (the layer's last call in the
    forward), and how many times the layer ran. Given ``calls``, the forward stops after that call."""
    ran = [0]

    def count(_p, out):
        ran[0] += 1
        if ran[0] == calls:
            raise _Reached
        return out

    with tap(model, [info.path], alter=count) as acts:
        try:
            model(x)
        except _Reached:
            pass
    out = acts[info.path]
    return (layer_rows(out, info).mean(2) if info.pooled else out.flatten(1)), ran[0]


_SOLVED: dict[str, tuple[int, torch.Tensor]] = {}  # the last few solves, by their inputs' bytes
_KEEP = 4


def _solve(jac: torch.Tensor, rhs: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(rank of jac, min-norm least-squares solution of jac @ sol = rhs)``. A ``jac`` of full column rank
    is found by gelsy (a QR factorisation with column pivoting): on a 32x32 RGB input's first layer per unit
    (4096 x 3072) it takes 8 s where gelsd's SVD took 73 (2 cores). Where gelsy finds less than full column
    rank, gelsd (an SVD) decides the rank, with ``torch.linalg.matrix_rank``'s cut-off σ_max · max(m, n) ·
    eps, and gives the min-norm solution (a per-channel record's ``jac`` is wide: its SVD is cheap). gelsy's
    verdict of full rank can differ from ``matrix_rank``'s where the smallest singular value lies within a
    small factor of that cut-off (a ``jac`` that close to singular gives no usable means either way). A run
    asks for the same solve again (``record`` states what the file reveals, each reconstruction starts from
    it): the last few answers are kept, found by a sha256 of both operands' bytes, so a repeat returns the
    same numbers without the factorisation."""
    h = hashlib.sha256(str((tuple(jac.shape), tuple(rhs.shape), jac.dtype)).encode())
    for t in (jac, rhs):
        h.update(t.detach().contiguous().cpu().numpy())  # its buffer, not a copy
    key = h.hexdigest()
    if key not in _SOLVED:
        res = torch.linalg.lstsq(jac, rhs, driver="gelsy") if jac.shape[0] >= jac.shape[1] else None
        if res is None or int(res.rank) < jac.shape[1]:
            res = torch.linalg.lstsq(jac, rhs, driver="gelsd")
        while len(_SOLVED) >= _KEEP:
            del _SOLVED[next(iter(_SOLVED))]
        _SOLVED[key] = int(res.rank), res.solution
    rank, sol = _SOLVED[key]
    return rank, sol.clone()


def _records(meta: Metadata) -> list[tuple[str, dict, LayerInfo]]:
    """``(kind, layer header, the statistic's layer)`` of every record of class means of a chosen layer:
    ``means_kind``'s (all-layers, else class-diag), then token-positions' (a pooled token layer's means at
    every position: the layer seen per unit)."""
    kind, layers = means_kind(meta.kinds), meta.header["layers"]
    out = [(kind, layer, LayerInfo.from_dict(layer)) for layer in layers] if kind else []
    if "token-positions" in meta.kinds:
        out += [("token-positions", layer, replace(LayerInfo.from_dict(layer), stat="unit"))
                for layer in positions(layers)]
    return out


def _affine(m: nn.Module, li: LayerInfo, shape: tuple[int, ...], g: torch.Generator):
    """``(s(0), the layer's calls)`` where the statistic of ``li`` is affine in the input of the float64 model
    ``m`` (checked on two random inputs of ``shape``), else None: a nonlinearity lies before the layer."""
    x, y = (torch.randn((2, *shape), generator=g, dtype=torch.float64) for _ in range(2))
    zero, calls = _stat(m, li, torch.zeros((1, *shape), dtype=torch.float64))
    s = lambda v: _stat(m, li, v, calls)[0]  # noqa: E731  (a layer called twice: its last call)
    lhs, rhs = s(x + 0.5 * y) - zero, s(x) - zero + 0.5 * (s(y) - zero)
    return (zero, calls) if torch.allclose(lhs, rhs, rtol=1e-6, atol=1e-8 * float(rhs.abs().max() + 1)) else None


@torch.no_grad()
def affine_in_input(model: nn.Module, infos: list[LayerInfo], shape: tuple[int, ...]) -> list[str]:
    """The paths of ``infos`` whose outputs are affine in the model's input of ``shape`` (each class's mean of
    them, per unit, gives each class's mean input wherever their map has full column rank)."""
    m, g = _float64(model), torch.Generator().manual_seed(0)
    return [i.path for i in infos if _affine(m, replace(i, stat="unit"), tuple(shape), g) is not None]


def _affine_records(model: nn.Module, meta: Metadata):
    """``(kind, layer header, J [dim, d], s(0) [1, dim])`` for every record of class means (``_records``) of a
    layer affine in the input (float64)."""
    info = meta.data
    d = math.prod(info.shape)
    m = _float64(model)
    g = torch.Generator().manual_seed(0)
    for kind, layer, li in _records(meta):
        found = _affine(m, li, info.shape, g)
        if found is None:
            continue
        zero, calls = found
        cols = [_stat(m, li, torch.eye(d, dtype=torch.float64)[i:i + 512].view(-1, *info.shape), calls)[0] - zero
                for i in range(0, d, 512)]
        yield kind, layer, torch.cat(cols).T, zero


@torch.no_grad()
def invert(model: nn.Module, meta: Metadata) -> list[Inversion]:
    """Class-mean inputs recovered from every record of ``means_kind`` (all-layers, else class-diag) of a
    layer affine in the input."""
    if math.prod(meta.data.shape) > MAX_INPUT_DIM:
        return []
    out = []
    for kind, layer, jac, zero in _affine_records(model, meta):
        mean = meta.get(kind, "mean", layer["path"]).double()
        rank, sol = _solve(jac, (mean - zero).T)  # min-norm least squares
        raw = meta.data.to_raw(sol.T.float().view(-1, *meta.data.shape))
        stat = "position" if kind == "token-positions" else layer["stat"]
        out.append(Inversion(layer["path"], stat, rank, jac.shape[1], REGISTRY[kind].form(layer), raw))
    return out


@torch.no_grad()
def revealed_means(model: nn.Module, meta: Metadata) -> torch.Tensor | None:
    """Each class's mean input ``[C, *shape]`` (raw units) where the file gives it exactly: from
    the first ``means_kind`` record (all-layers, else class-diag) affine in the input whose ``J`` has full column rank; else None."""
    if math.prod(meta.data.shape) > MAX_INPUT_DIM:
        return None
    for kind, layer, jac, zero in _affine_records(model, meta):
        mean = meta.get(kind, "mean", layer["path"]).double()
        rank, sol = _solve(jac, (mean - zero).T)
        if rank == jac.shape[1]:
            return meta.data.to_raw(sol.T.float().view(-1, *meta.data.shape))
    return None


def _float64(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).cpu().double().eval()


def reveals(model: nn.Module, meta: Metadata) -> list[dict] | str:
    """What follows from ``meta`` in closed form, as ``record`` writes it into the header: per affine
    record of ``means_kind`` (all-layers, else class-diag; the entry does not name it) its layer, form, and whether the class-mean inputs follow exactly."""
    if math.prod(meta.data.shape) > MAX_INPUT_DIM:
        return f"not measured (inputs of more than {MAX_INPUT_DIM} values)"
    exact = "exact up to the differential-privacy noise" if meta.header.get("privacy") else "exact"
    return [{"layer": i.layer, "stat": i.stat, "cov": i.cov, "rank": i.rank, "input_dim": i.input_dim,
             "class_means": (exact if i.rank == i.input_dim else f"projection of rank {i.rank}")}
            for i in invert(model, meta)]
