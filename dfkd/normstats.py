"""Normalisation layers without running statistics: LayerNorm and GroupNorm (and LayerNorm over a map's
channels, ConvNeXt style), what BatchNorm-free teachers (vision transformers, DP-SGD GroupNorm nets) have.

They keep nothing of the training data, so the publisher records it: per class, each feature's mean and
variance of each such layer's *input* (``kinds.NormStats``: a LayerNorm's features are its normalised
dimensions, pooled over the tokens or positions before them; a GroupNorm's are its channels, pooled over
positions). A batch then matches its own per-feature mean and (biased) variance against the moments of
the mixture of classes it holds (``mixture``): the recorded analogue of BatchNorm's running statistics,
exact for the batch's class mix instead of the training set's.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .moments import moments

NORMS = (nn.LayerNorm, nn.GroupNorm)


def norm_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, nn.Module]]:
    """Every LayerNorm and GroupNorm of ``model`` as ``(path, module)``, in registration order; given an
    ``example`` batch, those a forward pass of it runs with one input row per example (a layer never run, such
    as an auxiliary head's, or fed sequence-first, is left out)."""
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, NORMS)]
    if example is None or not norms:
        return norms
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda _m, inp, _o, p=p: ran.add(p) if len(inp[0]) == len(example) else None)
             for p, m in norms]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return [(p, m) for p, m in norms if p in ran]


def features(m: nn.Module) -> int:
    """The features a norm layer's input statistics keep: a GroupNorm's channels, a LayerNorm's normalised values."""
    return m.num_channels if isinstance(m, nn.GroupNorm) else math.prod(m.normalized_shape)


def norm_rows(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """A norm layer's input as ``[N, features, P]``: every position (token) of a sample a draw of its features."""
    if isinstance(m, nn.GroupNorm):
        return x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)
    return x.reshape(len(x), -1, features(m)).transpose(1, 2)


def batch_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and biased variance of ``rows [N, F, P]`` over samples and positions."""
    return moments(rows, (0, 2))


def mixture(share: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance ``[F]`` of the mixture of per-class Gaussians ``mean, var [K, F]`` in proportions
    ``share [K]`` (summing to 1): ``mu = sum_k p_k mu_k``, ``var = sum_k p_k (var_k + mu_k^2) - mu^2``."""
    mu = share @ mean
    return mu, (share @ (var + mean * mean) - mu * mu).clamp(min=0)
