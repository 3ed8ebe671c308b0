"""A faster input gradient for convolutions with few input channels, used while reconstructing.

On CPU, PyTorch's backward of ``conv2d`` to its input is slow when the layer has few
input channels (LeNet-5's first layer, 1 -> 6 channels: about 5x its forward). The same
gradient is a matrix product with the flattened kernel followed by ``fold`` (col2im).
Reconstruction freezes the teacher, so only that gradient is needed. ``input_grad_by_fold``
swaps the forward of every eligible ``Conv2d`` for one whose backward takes that route,
for the duration of a ``with`` block, and restores it after; the weights are untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# measured on LeNet-5's layers at batch 500: 1 input channel 1.6x faster, 6 channels no gain;
# benchmarks/bench_reconstruct.py reports the plain step with and without it
MAX_IN_CHANNELS = 3


class _ConvFoldGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape[-2:], stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        size, stride, padding = ctx.conf
        cols = weight.flatten(1).T @ g.flatten(2)  # [N, C_in * kh * kw, L]
        return F.fold(cols, size, weight.shape[-2:], padding=padding, stride=stride), None, None, None, None


def eligible(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and "forward" not in m.__dict__
            and m.groups == 1
            and m.dilation == (1, 1) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and m.in_channels <= MAX_IN_CHANNELS and not any(p.requires_grad for p in m.parameters()))


@contextmanager
def input_grad_by_fold(model: nn.Module, enabled: bool = True) -> Iterator[list[str]]:
    """Within the block, eligible frozen convolutions backpropagate to their input by fold;
    yields the paths that were switched."""
    mods = [(p, m) for p, m in model.named_modules() if enabled and eligible(m)]
    try:
        for _, m in mods:
            m.forward = lambda x, m=m: _ConvFoldGrad.apply(x, m.weight, m.bias, m.stride, m.padding)
        yield [p for p, _ in mods]
    finally:
        for _, m in mods:
            del m.forward
