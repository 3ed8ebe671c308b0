"""Reconstruction: Adam steps on a batch of inputs, per objective, against a plain teacher
forward + backward-to-input step on the same batch, measured in the same process.

The teacher is freshly initialised and its metadata recorded on 10,000 training images:
the cost of a step does not depend on the weights' values."""
from __future__ import annotations

import time

import torch

from dfkd.config import ReconstructConfig, RecordConfig, Runtime
from dfkd.fastgrad import eligible, input_grad_by_fold
from dfkd.objectives import make_objective
from dfkd.recipes import PROFILES
from dfkd.reconstruction import optimise_batch
from dfkd.recording import record
from dfkd.run_config import RunConfig

from .common import forward_flops, network, row

QUIET = Runtime(progress=False)  # no bars, no epoch lines in a measurement

TARGET = 0.60   # an objective's step runs at >= this share of the plain step's throughput
PEAK_TARGET = 0.50  # hinton-1200: achieved GFLOP/s >= this share of the matmul peak


def _plain_steps(m, shape, batch: int, steps: int, fold: bool = True) -> float:
    """Seconds for ``steps`` plain forward + backward-to-input steps (``fold``: with the
    faster input gradient of thin convolutions that reconstruction uses)."""
    x = torch.rand(batch, *shape, requires_grad=True)
    with input_grad_by_fold(m, fold):
        t0 = time.perf_counter()
        for _ in range(steps):
            x.grad = None
            m(x).sum().backward()
        return time.perf_counter() - t0


def measure(name: str, objective: str, peak: float, steps: int = 20) -> list[dict]:
    m, x, y, info = network(name, n=10000)
    m.eval()
    shape = info.shape
    jitter = PROFILES["quick"]["recipe"][name].get("jitter", 0)
    batch = PROFILES["quick"]["batch_size"]
    meta = record(m, (x, y), RecordConfig(conv_stats=RunConfig.conv_stats), info, rt=QUIET)
    for p in m.parameters():
        p.requires_grad_(False)
    f = 2 * forward_flops(m, shape)  # forward + backward to the activations and the input
    cfg = ReconstructConfig(objective=objective, steps=steps, batch_size=batch, jitter=jitter)
    obj = make_objective(objective, meta, m, cfg)
    labels = torch.arange(batch) % info.num_classes

    def objective_steps() -> float:
        t0 = time.perf_counter()
        optimise_batch(m, obj, labels, cfg, torch.Generator().manual_seed(0), info)
        return time.perf_counter() - t0

    _plain_steps(m, shape, batch, 2)
    objective_steps()  # burn-in
    # interleaved, best of three: both see the same machine state
    plain_s, obj_s = zip(*[(_plain_steps(m, shape, batch, steps), objective_steps()) for _ in range(3)])
    plain, rate = batch * steps / min(plain_s), batch * steps / min(obj_s)
    share = rate * f / 1e9 / peak
    targets, met = [f">= {TARGET:.0%} of plain"], rate / plain >= TARGET
    if name == "hinton-1200":
        targets.append(f">= {PEAK_TARGET:.0%} of peak")
        met = met and share >= PEAK_TARGET
    out = [row(name, "reconstruct", "plain forward+backward-to-input", "image-steps/s", plain, f)]
    if objective == "top-layer" and any(eligible(mod) for mod in m.modules()):  # what the fold route saves
        native = batch * steps / min(_plain_steps(m, shape, batch, steps, fold=False) for _ in range(2))
        out.append(row(name, "reconstruct", "plain, native conv input-gradient", "image-steps/s", native, f,
                       reference="plain step", ratio=native / plain))
    out.append(row(name, "reconstruct", objective, "image-steps/s", rate, f, reference="plain step (same process)",
                   ratio=rate / plain, target=", ".join(targets), met=met))
    return out
