"""Distillation: one epoch over N inputs against one real-data training epoch of the same
student over N images (batch 64 both), in the same process: with the logits stored beside the
synthetic set, and with the default recipe (each epoch augmented and labelled by the teacher,
whose forward pass is the difference)."""
from __future__ import annotations

import time

import torch

from dfkd.config import DistillConfig, Runtime
from dfkd.distillation import distill
from dfkd.data import at_input
from dfkd.models import build_model, predict_logits
from dfkd.recipes import PAIRS

from .bench_train import train_epoch_seconds
from .common import forward_flops, network, row

QUIET = Runtime(progress=False)  # no bars, no epoch lines in a measurement

TARGET = 1.1  # a distillation epoch costs at most this many real-data training epochs


def measure(teacher_name: str, n: int = 10000) -> list[dict]:
    student_name = PAIRS[teacher_name]
    teacher, x, _, info = network(teacher_name, n=n)  # real images stand in for a synthetic set: the cost is the same
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model(student_name, info)[0].eval()
    logits = predict_logits(at_input(teacher, info), x)  # raw inputs, normalised at the network
    fs, ft = forward_flops(student, info.shape), forward_flops(teacher, info.shape)
    rows = []
    for augment in ("none", DistillConfig.augment):
        cfg = DistillConfig(epochs=1, augment=augment)
        online = teacher if augment != "none" else None  # "none": the logits stored with the set
        distill(build_model(student_name, info)[0], (x[:4 * cfg.batch_size], logits[:4 * cfg.batch_size]), online,
                cfg, info=info, rt=QUIET)  # burn-in
        torch.manual_seed(0)
        t0 = time.perf_counter()
        distill(build_model(student_name, info)[0], (x, logits), online, cfg, info=info, rt=QUIET)
        secs = time.perf_counter() - t0
        what = "epoch, stored logits" if online is None else f"epoch, {augment} + teacher labels"
        rows.append(row(f"{teacher_name}->{student_name}", "distill", what, "images/s", n / secs,
                        3 * fs + (ft if online is not None else 0), reference="student real-data epoch (best of 2)",
                        seconds=secs))
    train_s = min(train_epoch_seconds(student_name, n, DistillConfig.batch_size) for _ in range(2))
    for r in rows:
        r.update(ratio=r["seconds"] / train_s, target=f"<= {TARGET:g}x", met=r["seconds"] / train_s <= TARGET)
    return rows
