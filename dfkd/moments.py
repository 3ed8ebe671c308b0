"""Batch moments and a weighted squared distance with a short backward: the reconstruction losses' hot path.

Every reconstruction step matches large activation maps (a per-unit record of a ``[500, 16, 32, 32]`` map is
8 million values a layer) against stored moments. Written as plain tensor expressions, autograd walks each map
a dozen times a step (subtract, square, divide, and their backwards), and on a CPU those memory-bound passes
took more of a step than the convolutions (``python -m benchmarks cpu-steps``, its "plain losses" row). Here:

- ``moments(x, dims, correction)``: the mean, then the variance of the centred values (accurate where a unit's
  mean dwarfs its spread, unlike ``E[x^2] - m^2``); the input's gradient
  ``g_m / n + g_v 2 (x - m) / (n - correction)`` is one multiply and one add over the centred values kept
  (``torch.var_mean``'s single pass is several times slower on a CPU). Inputs below float32 (bf16 autocast)
  take the plain expressions, ``x.mean`` and ``x.var``.
- ``sq_distance(x, t, w)``: ``sum_b mean_d (w_d (x_bd - t_bd))^2``; the weighted difference is kept from the
  forward pass and is the gradient up to a factor (its value summed by one BLAS dot product).
- ``cycle(labels)``: reconstruction lays a batch's intended labels out as one period repeated
  (``(arange(B) + offset) % K``), so each class's rows are a strided view; ``0`` where they are not.

The backwards are first derivatives only (``once_differentiable``: a second one raises). The tests check each
against the plain expressions in float64 (values, gradients, finite differences) and ``moments`` and
``unit_match`` in float32 against float64 for a unit whose mean is 1,000 times its spread. Within ``unfused()``
all three take the plain expressions the losses were written in before (the benchmark's comparison).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch.autograd.function import once_differentiable

_FUSED: ContextVar[bool] = ContextVar("dfkd_fused_losses", default=True)
_EXACT = (torch.float32, torch.float64)


@contextmanager
def unfused() -> Iterator[None]:
    """Within the block (this thread or task), the plain tensor expressions (autograd's many passes)."""
    token = _FUSED.set(False)
    try:
        yield
    finally:
        _FUSED.reset(token)


class _Moments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dims, correction):
        n = math.prod(x.shape[d] for d in dims)
        mean = x.mean(dims, keepdim=True)
        d = x - mean
        var = (d * d).mean(dims) * (n / (n - correction))
        ctx.save_for_backward(d)
        ctx.keep, ctx.n, ctx.correction = mean.shape, n, correction
        return mean.squeeze(dims), var

    @staticmethod
    @once_differentiable
    def backward(ctx, gm, gv):
        (d,) = ctx.saved_tensors
        a = gm.reshape(ctx.keep) / ctx.n if gm is not None else None                           # d/dx of the mean
        if gv is None:
            return a.expand(d.shape).contiguous(), None, None
        b = gv.reshape(ctx.keep) * (2.0 / (ctx.n - ctx.correction))                             # d/dx of the variance
        g = torch.mul(d, b)  # a multiply then an in-place add: faster than one broadcast torch.addcmul on a CPU
        return (g.add_(a) if a is not None else g), None, None


def moments(x: torch.Tensor, dims: tuple[int, ...], correction: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of ``x`` over ``dims`` (divided by ``n - correction``: 0 biased, 1 unbiased)."""
    dims = tuple(sorted({d % x.dim() for d in dims}))
    n = math.prod(x.shape[d] for d in dims)
    if not (x.requires_grad and _FUSED.get()) or x.dtype not in _EXACT or n - correction <= 0:
        return x.mean(dims), x.var(dims, correction=correction)  # the plain expressions (n - correction <= 0: nan)
    return _Moments.apply(x, dims, correction)


class _SqDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, w):
        d = (x - t).mul_(w)
        ctx.save_for_backward(d, w)
        flat = d.reshape(-1)
        return torch.dot(flat, flat) / d.shape[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        d, w = ctx.saved_tensors
        return d * (w * (2.0 * g / d.shape[-1])), None, None


def sq_distance(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``((x - t) * w).pow(2).mean(-1).sum()`` for rows ``x, t [B, D]`` and weights ``w [D]``; the fused
    gradient is the input's alone, so a target or weight that needs one takes the plain expression."""
    plain = (not (x.requires_grad and _FUSED.get()) or not isinstance(t, torch.Tensor) or not isinstance(w, torch.Tensor)
             or t.requires_grad or w.requires_grad or x.dim() != 2 or x.shape != t.shape or x.dtype not in _EXACT
             or t.dtype != x.dtype or w.dtype != x.dtype)
    return ((x - t) * w).pow(2).mean(-1).sum() if plain else _SqDistance.apply(x, t, w)


_LAST: list = [(None, -1, 0)]  # the labels last asked about, their version, their period (one tuple: read whole)


def cycle(labels: torch.Tensor) -> int:
    """The period ``p`` when ``labels`` is ``labels[:p]`` (``p`` distinct labels) repeated a whole number of times
    (at least twice), else 0. Worked out once per labels tensor (a batch's steps and layers all ask with the same
    one; on a GPU each answer is a host sync), again when it is changed in place."""
    if not _FUSED.get():
        return 0
    last, version, period = _LAST[0]
    if last is labels and version == labels._version:
        return period
    b = len(labels)
    p = int(labels.unique().numel()) if b else 0
    if p and (b % p or b // p < 2 or not torch.equal(labels.view(-1, p), labels[:p].expand(b // p, p))):
        p = 0
    _LAST[0] = (labels, labels._version, p)
    return p
