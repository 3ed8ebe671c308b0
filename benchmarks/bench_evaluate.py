"""Evaluation: batched inference over the 10,000 real test images, teacher and student."""
from __future__ import annotations

import time

from dfkd.loop import accuracy

from .common import forward_flops, network, row


def measure(name: str) -> dict:
    m, x, y, info = network(name, "test")
    m.eval()
    accuracy(m, (x[:2048], y[:2048]))  # burn-in
    t0 = time.perf_counter()
    accuracy(m, (x, y))
    return row(name, "evaluate", "test set, batch 2048", "images/s", len(x) / (time.perf_counter() - t0),
               forward_flops(m, info.shape))
