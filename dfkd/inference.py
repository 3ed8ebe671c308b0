"""ONNX Runtime on exported files: the deploy extra's modules imported on use (``deploy_module``: dfkd itself
runs without them), a CPU session, logits and true-label accuracy batch by batch, latency and throughput,
and inputs spread over a data's range for checks and timing."""
from __future__ import annotations

import importlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .data import DataInfo, as_batches
from .errors import DfkdError

INPUT, OUTPUT = "input", "logits"


def deploy_module(name: str):
    """``onnx``, ``onnxruntime``, ``onnxruntime.quantization`` or ``onnxscript``: the deploy extra's, or
    one line that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DfkdError("export", f"needs {name.split('.')[0]}: pip install 'dfkd[deploy]' (onnx, onnxscript, "
                        "onnxruntime; CPU only)") from None


def session(model: bytes | str | Path, threads: int = 0):
    """An ONNX Runtime CPU session on a file or its bytes (``threads`` 0: the runtime's default)."""
    ort = deploy_module("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, raw: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``raw`` inputs from an ONNX Runtime session, batch by batch."""
    out = [sess.run(None, {INPUT: raw[i:i + batch_size].float().numpy()})[0] for i in range(0, len(raw), batch_size)]
    return torch.from_numpy(np.concatenate(out))


def accuracy(sess, split, batch_size: int = 1024) -> float:
    """True-label accuracy of an ONNX Runtime session on a split of raw inputs, batch by batch."""
    right = total = 0
    for x, y in as_batches(split, batch_size):
        right += int((run_onnx(sess, x, batch_size).argmax(1) == y).sum())
        total += len(y)
    return right / max(total, 1)


def latency(fn, x: torch.Tensor, seconds: float = 1.0) -> float:
    """Median seconds of ``fn(x)``, called for about ``seconds`` (at least 10 times) after 3 untimed calls."""
    for _ in range(3):
        fn(x)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 10:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speeds(fn, info: DataInfo, batches: tuple[int, ...] = (1, 64), seconds: float = 1.0) -> dict:
    """``fn``'s latency (``b<N>_ms``: median ms per batch) and throughput (``b<N>_per_s``: inputs/s) at each
    batch size, on inputs spread over the data's range."""
    out = {}
    for b in batches:
        s = latency(fn, example_inputs(info, b), seconds)
        out[f"b{b}_ms"], out[f"b{b}_per_s"] = 1e3 * s, b / s
    return out


def example_inputs(info: DataInfo, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` raw inputs spread over the data's range (uniform), for tracing and checks."""
    g = torch.Generator().manual_seed(seed)
    return info.low + (info.high - info.low) * torch.rand((n, *info.shape), generator=g)
