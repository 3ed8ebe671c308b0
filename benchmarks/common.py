"""Shared helpers: a timer with burn-in, this machine's fp32 matmul peak, peak memory in a child process."""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Callable

import torch


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


def _child(conn, fn, args):
    from dfkd.runtime import setup_threads
    setup_threads()  # a spawned process starts with torch's default, which may be fewer threads
    out = fn(*args)
    out["threads"] = torch.get_num_threads()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    conn.send(out)
    conn.close()


def in_child(fn: Callable[..., dict], *args) -> dict:
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
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")
        print(f"wrote {path}")
