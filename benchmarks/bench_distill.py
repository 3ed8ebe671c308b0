"""Distillation: one epoch over N inputs against one real-data training epoch of the same
student over N images (batch 64 both), in the same process: with the logits stored beside the
synthetic set, and with the default recipe (each epoch augmented and labelled by the teacher,
whose forward pass is the difference)."""
from __future__ import annotations

import time

import torch

from dfkd.config import DistillConfig
from dfkd.data import load_mnist, to_input
from dfkd.distill import distill_model
from dfkd.models import build_model, predict_logits
from dfkd.pipeline import PAIRS

from .bench_train import train_epoch_seconds
from .common import forward_flops, row

TARGET = 1.1  # a distillation epoch costs at most this many real-data training epochs


def measure(teacher_name: str, n: int = 10000) -> list[dict]:
    student_name = PAIRS[teacher_name]
    data = load_mnist()
    torch.manual_seed(0)
    teacher = build_model(teacher_name).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model(student_name).eval()
    # real images stand in for a synthetic set: the cost is the same
    x = to_input(data.train_x[:n], student.input_shape)
    logits = predict_logits(teacher, x)
    fs, ft = forward_flops(student), forward_flops(teacher)
    rows = []
    for augment in ("none", DistillConfig.augment):
        cfg = DistillConfig(student=student_name, epochs=1, augment=augment, progress=False)
        online = teacher if augment != "none" else None  # "none": the logits stored with the set
        distill_model(build_model(student_name), x[:4 * cfg.batch_size], logits[:4 * cfg.batch_size], cfg,
                      teacher=online)  # burn-in
        torch.manual_seed(0)
        t0 = time.perf_counter()
        distill_model(build_model(student_name), x, logits, cfg, teacher=online)
        secs = time.perf_counter() - t0
        what = "epoch, stored logits" if online is None else f"epoch, {augment} + teacher labels"
        rows.append(row(f"{teacher_name}->{student_name}", "distill", what, "images/s", n / secs,
                        3 * fs + (ft if online is not None else 0), reference="student real-data epoch (best of 2)",
                        seconds=secs))
    train_s = min(train_epoch_seconds(student_name, n, DistillConfig.batch_size, data) for _ in range(2))
    for r in rows:
        r.update(ratio=r["seconds"] / train_s, target=f"<= {TARGET:g}x", met=r["seconds"] / train_s <= TARGET)
    return rows
