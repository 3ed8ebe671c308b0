"""Evaluation: batched inference over the 10,000 real test images, teacher and student."""
from __future__ import annotations

import time

import torch

from dfkd.data import load_mnist, to_input
from dfkd.evaluate import accuracy
from dfkd.models import build_model

from .common import forward_flops, row


def measure(name: str) -> dict:
    data = load_mnist()
    torch.manual_seed(0)
    m = build_model(name).eval()
    x = to_input(data.test_x, m.input_shape)
    accuracy(m, x[:2048], data.test_y[:2048])  # burn-in
    t0 = time.perf_counter()
    accuracy(m, x, data.test_y)
    return row(name, "evaluate", "test set, batch 2048", "images/s", len(x) / (time.perf_counter() - t0),
               forward_flops(m))
