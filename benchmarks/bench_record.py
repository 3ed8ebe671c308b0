"""Recording every metadata kind against one plain inference pass over the same 60,000 images."""
from __future__ import annotations

import time

import torch

from dfkd.data import load_mnist, to_input
from dfkd.metadata import KINDS
from dfkd.models import build_model
from dfkd.record import record

from .common import forward_flops, row

TARGET = 2.0  # recording all kinds costs at most this many inference passes


def measure(name: str, batch_size: int = 1000) -> list[dict]:
    data = load_mnist()
    torch.manual_seed(0)
    m = build_model(name).eval()
    x = to_input(data.train_x, m.input_shape)

    def inference() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            for i in range(0, len(x), batch_size):
                m(x[i:i + batch_size])
            return time.perf_counter() - t0

    inference()  # burn-in
    infer, pass_s = float("inf"), float("inf")
    for _ in range(2):  # interleaved, best of two each: this machine's timings move by 10 to 30%
        infer = min(infer, inference())
        meta = record(m, data, kinds=list(KINDS), batch_size=batch_size, progress=False)
        pass_s, basis_s = min(pass_s, meta.timings["pass_seconds"]), meta.timings["basis_seconds"]
    f = forward_flops(m)
    return [row(name, "record", "plain inference pass", "images/s", len(x) / infer, f),
            row(name, "record", "all four kinds", "images/s", len(x) / pass_s, f, reference="inference pass",
                ratio=pass_s / infer, target=f"<= {TARGET:g}x", met=pass_s / infer <= TARGET,
                basis_seconds=basis_s)]
