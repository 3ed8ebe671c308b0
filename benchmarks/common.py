"""Shared helpers: timing, this machine's fp32 matmul peak, FLOPs counted from layer shapes,
peak memory of a child process, and the one row format every stage reports."""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def timeit(fn: Callable[[], object], repeat: int = 3, burn_in: int = 1) -> float:
    """Best wall time of ``repeat`` calls after ``burn_in`` untimed ones (seconds)."""
    for _ in range(burn_in):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_gflops(n: int = 2048, repeat: int = 5) -> float:
    """fp32 GEMM throughput of this machine, now, with torch's thread setting."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timeit(lambda: a @ b, repeat=repeat) / 1e9


def network(name: str, split: str = "train", n: int | None = None):
    """A fresh registry network (seeded) and ``n`` MNIST inputs fitted to it, as tensors."""
    from dfkd.data import as_batches
    from dfkd.sources import open_data
    from dfkd.models import build_model
    torch.manual_seed(0)
    model, info = build_model(name, open_data("mnist").info)
    data = getattr(open_data("mnist", info=info), split)
    n = n or len(data)
    x, y = next(as_batches(data, n))
    return model, x, y, info


def forward_flops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of one sample's forward pass, counted from the shapes of its Linear and Conv2d
    layers (2 per multiply-add; activations, pooling and biases are not counted)."""
    total = 0.0

    def hook(m, _inp, out):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += 2.0 * m.in_features * m.out_features
        else:
            total += 2.0 * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * out[0].numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in hs:
            h.remove()
    return total


def row(network: str, stage: str, what: str, unit: str, rate: float, flops_per_unit: float, *,
        reference: str = "", ratio: float | None = None, target: str = "", met: bool | None = None,
        **extra) -> dict:
    """One line of the table: throughput, achieved GFLOP/s, and a ratio to a same-run reference."""
    return dict(network=network, stage=stage, what=what, unit=unit, rate=rate, gflops=rate * flops_per_unit / 1e9,
                reference=reference, ratio=ratio, target=target, met=met, **extra)


def _child(conn, fn, args):
    from dfkd.runtime import setup_threads
    setup_threads()  # a spawned process starts with torch's default, which may be fewer threads
    out = fn(*args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in out if isinstance(out, list) else [out]:
        r["threads"], r["peak_rss_mb"] = torch.get_num_threads(), rss
    conn.send(out)
    conn.close()


def in_child(fn: Callable[..., dict | list], *args):
    """Run ``fn(*args)`` in a fresh process so that its peak resident memory is its own."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child, fn, args))
    p.start()
    out = parent.recv()
    p.join()
    return out


def dump(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)
        print(f"wrote {path}")
