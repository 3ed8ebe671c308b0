"""Distillation: one epoch over N inputs (the default recipe: batch 64, the teacher labelling a
shifted copy of each batch online) against one real-data training epoch of the same student
over N images, in the same process."""
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


def measure(teacher_name: str, n: int = 10000) -> dict:
    student_name = PAIRS[teacher_name]
    data = load_mnist()
    torch.manual_seed(0)
    teacher = build_model(teacher_name).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model(student_name)
    # real images stand in for a synthetic set: the cost is the same
    x = to_input(data.train_x[:n], student.input_shape)
    logits = predict_logits(teacher, x)
    cfg = DistillConfig(student=student_name, epochs=1, progress=False)
    distill_model(build_model(student_name), x[:4 * cfg.batch_size], logits[:4 * cfg.batch_size], cfg,
                  teacher=teacher)  # burn-in
    t0 = time.perf_counter()
    distill_model(student, x, logits, cfg, teacher=teacher)
    secs = time.perf_counter() - t0
    train_s = train_epoch_seconds(student_name, n, cfg.batch_size)
    f = 3 * forward_flops(student) + forward_flops(teacher)
    return row(f"{teacher_name}->{student_name}", "distill", f"epoch, batch {cfg.batch_size}, augment {cfg.augment}",
               "images/s", n / secs, f, reference="student real-data epoch", ratio=secs / train_s,
               target=f"<= {TARGET:g}x", met=secs / train_s <= TARGET)
