"""Training on real data: one epoch of Adam at the default batch size (64), per network."""
from __future__ import annotations

import time

from dfkd.config import TrainConfig
from dfkd.loop import fit
from dfkd.training import cross_entropy_loss

from .common import forward_flops, network, row


def train_epoch_seconds(name: str, n: int, batch_size: int = TrainConfig.batch_size) -> float:
    """Seconds of one real-data training epoch of a fresh ``name`` over ``n`` images."""
    m, x, y, _ = network(name, n=n)
    fit(m, (x[:4 * batch_size], y[:4 * batch_size]), cross_entropy_loss, epochs=1,
        batch_size=batch_size, lr=1e-3, seed=0, progress=False)  # burn-in
    t0 = time.perf_counter()
    fit(m, (x, y), cross_entropy_loss, epochs=1, batch_size=batch_size, lr=1e-3, seed=0, progress=False)
    return time.perf_counter() - t0


def measure(name: str, n: int = 10000) -> dict:
    secs = train_epoch_seconds(name, n)
    m, x, _, info = network(name, n=2)
    # forward, backward to the activations and backward to the weights: 3 forwards
    return row(name, "train", "real-data epoch, batch 64", "images/s", n / secs, 3 * forward_flops(m, info.shape),
               seconds_per_60k_epoch=secs * 60000 / n)
