"""A user's own model through the Python API: every objective on a teacher dfkd did not define.

``python -m benchmarks own [--teacher SPEC] [--student SPEC] [--data SPEC] [--images N] [--steps S]``
trains the teacher and a real-data student (``--teacher-epochs``), records the teacher's
metadata, then for each objective reconstructs ``N`` inputs x ``S`` Adam steps (the same
priors for all: ``--jitter``, ``--tv``) and distills the student on them (``--epochs``, affine
views labelled by the teacher). Prints one table (test
accuracy against the true labels, last epoch; share of the real-data student) and writes it as
``<out>/own.{md,json}``. Every stage resumes where it stopped."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dfkd
from dfkd.checkpoint import load_model, save_model
from dfkd.config import DistillConfig, ReconstructConfig, RecordConfig, TrainConfig, Runtime
from dfkd.files import atomic_write
from dfkd.metadata import load, save
from dfkd.specs import build_student
from dfkd.synthetic import SyntheticSet

QUIET = Runtime(progress=False)  # no bars, no epoch lines in a measurement

OBJECTIVES = ("noise", "top-layer", "all-layers", "spectral-all", "spectral-pairs", "bn-stats", "all-layers+bn-stats")


def _trained(spec: str, data, out: Path, epochs: int, lr: float, seed: int) -> tuple[torch.nn.Module, float]:
    if out.with_name(out.name + ".json").is_file():
        model, desc, _ = load_model(out, code=[spec.rpartition(":")[0]])
        return model, desc["test_accuracy"]
    torch.manual_seed(seed)
    model, info = dfkd.build_model(spec, data.info)
    hist = dfkd.train(model, data, TrainConfig(epochs=epochs, lr=lr, seed=seed), rt=QUIET)
    save_model(model, out, spec, {}, info, test_accuracy=hist[-1]["test_accuracy"], history=hist)
    return model, hist[-1]["test_accuracy"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks own", description=__doc__.split("\n\n")[1])
    p.add_argument("--teacher", default="examples/own_model.py:teacher")
    p.add_argument("--student", default="examples/own_model.py:student")
    p.add_argument("--data", default="mnist")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.2, help="Adam on the inputs")
    p.add_argument("--jitter", type=int, default=2)
    p.add_argument("--tv", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=30, help="distillation epochs")
    p.add_argument("--student-lr", type=float, default=1e-2, help="Adam, for distillation and the real-data student")
    p.add_argument("--teacher-epochs", type=int, default=2, help="epochs of the teacher and the real-data student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/own")
    a = p.parse_args(argv)
    from dfkd.runtime import setup_threads
    setup_threads()
    out, t0 = Path(a.out), time.perf_counter()
    data = dfkd.open_data(a.data)
    teacher, t_acc = _trained(a.teacher, data, out / "teacher", a.teacher_epochs, 1e-3, a.seed)
    _, real_acc = _trained(a.student, data, out / "student-real", a.teacher_epochs, a.student_lr, a.seed)
    spath = out / "teacher.stats.safetensors"
    if not spath.is_file():
        save(dfkd.record(teacher, data, RecordConfig(), rt=QUIET), spath)
    meta = load(spath)
    rows = [{"objective": "real data", "accuracy": real_acc, "share": 1.0}]
    for name in a.objectives.split(","):
        s0 = time.perf_counter()
        rc = ReconstructConfig(objective=name, n=a.images, steps=a.steps, lr=a.lr, jitter=a.jitter, tv=a.tv,
                               seed=a.seed)
        dfkd.reconstruct(teacher, meta, out / "synthetic" / name, rc, data.info, rt=QUIET)
        synth = SyntheticSet(out / "synthetic" / name).open()
        torch.manual_seed(a.seed)
        student = build_student(a.student, {}, data.info)
        hist = dfkd.distill(student, synth, teacher, DistillConfig(epochs=a.epochs, lr=a.student_lr,
                                                                   eval_every=a.epochs, seed=a.seed),
                            data, rt=QUIET)
        agree = sum(s["teacher_agrees"] * s["n"] for s in synth.manifest["shards"]) / len(synth)
        rows.append({"objective": name, "accuracy": hist[-1]["test_accuracy"], "share": hist[-1]["test_accuracy"] / real_acc,
                     "teacher_agrees": agree, "seconds": time.perf_counter() - s0})
        print(f"{name}: {100 * rows[-1]['accuracy']:.2f}% ({100 * rows[-1]['share']:.1f}% of real data), "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    lines = [f"teacher {a.teacher} ({100 * t_acc:.2f}%) -> student {a.student} on {a.data}; {a.images} inputs x "
             f"{a.steps} Adam steps (lr {a.lr}, jitter {a.jitter}, tv {a.tv}) per objective, {a.epochs} distillation "
             f"epochs at lr {a.student_lr}; real-data student: {a.teacher_epochs} epochs at lr {a.student_lr}\n",
             "| objective | student % | share of real-data student % | teacher agrees with the intended label % |",
             "|---|---|---|---|"]
    for r in rows:
        agree = f"{100 * r['teacher_agrees']:.1f}" if "teacher_agrees" in r else ""
        lines.append(f"| {r['objective']} | {100 * r['accuracy']:.2f} | {100 * r['share']:.1f} | {agree} |")
    md = "\n".join(lines) + f"\n\nwall time {time.perf_counter() - t0:.0f} s\n"
    atomic_write(out / "own.md", md)
    atomic_write(out / "own.json", json.dumps({"args": vars(a), "teacher_accuracy": t_acc, "rows": rows}, indent=2))
    print(md)
    return rows
