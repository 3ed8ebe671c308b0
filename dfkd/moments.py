"""Batch moments and a weighted squared distance with a one-pass backward: the reconstruction losses' hot path.

Every reconstruction step matches large activation maps (a per-unit record of a ``[500, 16, 32, 32]`` map is
8 million values a layer) against stored moments. Written as plain tensor expressions, autograd walks each map
a dozen times a step (subtract, square, divide, and their backwards), and on a CPU those memory-bound passes,
not the convolutions, took about four fifths of a step (``benchmarks/bench_losses.py``). The functions here
give the same values and gradients with one pass forward and one backward:

- ``moments(x, dims, correction)``: the mean and variance over ``dims`` by ``torch.var_mean``; the input's
  gradient ``g_m / n + g_v 2 (x - m) / (n - correction)`` is one fused multiply-add (``torch.addcmul``).
- ``sq_distance(x, t, w)``: ``sum_b mean_d (w_d (x_bd - t_bd))^2``, its gradient ``2 w^2 (x - t) / d`` kept
  from the forward pass.
- ``cycle(labels)``: reconstruction lays a batch's intended labels out as one period repeated
  (``(arange(B) + offset) % K``), so each class's rows are a strided view; ``0`` where they are not.

Each is checked against the plain expression in float64 (values and gradients) by the tests; within
``unfused()`` all three take the plain expressions (what ``python -m benchmarks cpu-steps`` compares against).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

_FUSED = [True]


@contextmanager
def unfused() -> Iterator[None]:
    """Within the block, the plain tensor expressions (autograd's many passes), for a comparison."""
    _FUSED.append(False)
    try:
        yield
    finally:
        _FUSED.pop()


class _Moments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dims, correction):
        n = math.prod(x.shape[d] for d in dims)
        mean = x.mean(dims)  # two plain reductions: torch.var_mean's one pass is several times slower on a CPU
        var = ((x * x).mean(dims) - mean * mean).clamp_(min=0) * (n / (n - correction))
        ctx.save_for_backward(x, mean)
        ctx.keep = [1 if i in dims else s for i, s in enumerate(x.shape)]  # the moments' shape beside x's
        ctx.n, ctx.correction = n, correction
        return mean, var

    @staticmethod
    def backward(ctx, gm, gv):
        x, mean = ctx.saved_tensors
        mean = mean.reshape(ctx.keep)
        zero = torch.zeros_like(mean)
        a = zero if gm is None else gm.reshape(ctx.keep) / ctx.n                               # d/dx of the mean
        b = zero if gv is None else gv.reshape(ctx.keep) * (2.0 / (ctx.n - ctx.correction))   # d/dx of the variance
        return torch.mul(x, b).add_(a - b * mean), None, None  # faster than one broadcast torch.addcmul on a CPU


def moments(x: torch.Tensor, dims: tuple[int, ...], correction: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of ``x`` over ``dims`` (divided by ``n - correction``: 0 biased, 1 unbiased)."""
    dims = tuple(sorted({d % x.dim() for d in dims}))
    n = math.prod(x.shape[d] for d in dims)
    if not x.requires_grad or n - correction <= 0 or not _FUSED[-1]:  # nothing to fuse, or a variance torch makes nan/inf itself
        var, mean = torch.var_mean(x, dims, correction=correction)
        return mean, var
    return _Moments.apply(x, dims, correction)


class _SqDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, w):
        d = (x - t).mul_(w)
        ctx.save_for_backward(d, w)
        flat = d.reshape(-1)
        return torch.dot(flat, flat) / d.shape[-1]

    @staticmethod
    def backward(ctx, g):
        d, w = ctx.saved_tensors
        return d * (w * (2.0 * g / d.shape[-1])), None, None


def sq_distance(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``((x - t) * w).pow(2).mean(-1).sum()`` for rows ``x, t [B, D]`` and weights ``w [D]``; the fused
    gradient is the input's alone, so a target or weight that needs one takes the plain expression."""
    if not (x.requires_grad and _FUSED[-1]) or t.requires_grad or w.requires_grad or x.dim() != 2 or x.shape != t.shape:
        return ((x - t) * w).pow(2).mean(-1).sum()
    return _SqDistance.apply(x, t, w)


def cycle(labels: torch.Tensor) -> int:
    """The period ``p`` when ``labels`` is ``labels[:p]`` (``p`` distinct labels) repeated a whole number of times
    (at least twice), else 0."""
    b = len(labels)
    p = int(labels.unique().numel()) if b and _FUSED[-1] else 0
    if p == 0 or b % p or b // p < 2:
        return 0
    return p if torch.equal(labels.view(-1, p), labels[:p].expand(b // p, p)) else 0
