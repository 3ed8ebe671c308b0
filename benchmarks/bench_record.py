"""Recording every metadata kind against one plain inference pass over the same 60,000 images."""
from __future__ import annotations

import time

import torch

from dfkd.config import RecordConfig, Runtime
from dfkd.metadata import KINDS
from dfkd.recording import record

from .common import forward_flops, network, row

QUIET = Runtime(progress=False)  # no bars, no epoch lines in a measurement

TARGET = 2.0  # recording all kinds costs at most this many inference passes (the paper's networks)
CONV_TARGET = 3.0  # and on a BatchNorm / residual CNN with per-channel conv statistics
OWN = "examples/own_model.py:teacher"


def measure(name: str, batch_size: int = 1000, n: int | None = None) -> list[dict]:
    """``name``: a registry network, or ``own`` (the BN/GELU/residual CNN of examples/own_model.py)."""
    if name == "own":
        from dfkd.data import as_batches
        from dfkd.sources import open_data
        from dfkd.models import build_model
        torch.manual_seed(0)
        m, info = build_model(OWN, open_data("mnist").info)
        data = open_data("mnist").train
        x, y = next(as_batches(data, n or 20000))
        target = CONV_TARGET
    else:
        m, x, y, info = network(name, n=n)
        target = TARGET
    m.eval()

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
        meta = record(m, (x, y), RecordConfig(kinds=KINDS, batch_size=batch_size), rt=QUIET)
        pass_s, basis_s = min(pass_s, meta.timings["pass_seconds"]), meta.timings["basis_seconds"]
    f = forward_flops(m, info.shape)
    label = "own BN/residual CNN" if name == "own" else name
    return [row(label, "record", "plain inference pass", "images/s", len(x) / infer, f),
            row(label, "record", "all four kinds", "images/s", len(x) / pass_s, f, reference="inference pass",
                ratio=pass_s / infer, target=f"<= {target:g}x", met=pass_s / infer <= target,
                basis_seconds=basis_s)]
