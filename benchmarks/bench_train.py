"""Seconds per training epoch (60,000 real MNIST images, batch 64, Adam) for every registry network."""
from __future__ import annotations

import time

import torch

from dfkd.data import load_mnist, to_input
from dfkd.models import MODELS, build_model
from dfkd.train import cross_entropy_loss, fit

from .common import in_child


def one_epoch(name: str, n: int) -> dict:
    data = load_mnist()
    torch.manual_seed(0)
    m = build_model(name)
    x = to_input(data.train_x[:n], m.input_shape)
    t0 = time.perf_counter()
    fit(m, x, data.train_y[:n], cross_entropy_loss, epochs=1, batch_size=64, lr=1e-3, seed=0, progress=False)
    secs = time.perf_counter() - t0
    return {"model": name, "images": n, "seconds": secs, "seconds_per_60k_epoch": secs * 60000 / n,
            "images_per_s": n / secs}


def run(n: int = 20000) -> list[dict]:
    rows = [in_child(one_epoch, name, n) for name in MODELS]
    print(f"{'model':<14}{'s / epoch (60k)':>16}{'images/s':>12}{'peak MB':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['seconds_per_60k_epoch']:>16.1f}{r['images_per_s']:>12.0f}{r['peak_rss_mb']:>10.0f}")
    return rows
