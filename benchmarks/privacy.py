"""The price of private metadata: student accuracy against epsilon, and what a private file reveals.

``python -m benchmarks privacy [--run runs/quick] [--own runs/own] [--eps inf,10,3,1,0.3] [--seeds 0,1,2]
[--out docs/privacy]`` takes the LeNet-5 teacher of a finished ``dfkd run`` and, if given, the
own-model benchmark's BN/residual teacher (``python -m benchmarks own``). For every epsilon and
seed it records the teacher's statistics on its training set (``dfkd.record`` with
``privacy=epsilon``, secret noise from the operating system, never seeded; ``inf``: exact),
reconstructs a synthetic set with the model's recipe and distills its student (LeNet-5-half; the
own model's GELU student), both seeded by the seed; the student's accuracy is on the real test
set against the true labels.
Beside it, the leakage: the class means recovered in closed form (``dfkd.leakage``) from an
unprotected all-layers file per unit and from the same file at epsilon 1, against the true
class means. Writes ``<out>.json``, ``<out>.md``, ``<out>.png`` (accuracy against epsilon)
and ``<out>-leakage.png`` (rows: classes; columns: truth, unprotected, epsilon 1). Every cell
is kept in the JSON as it finishes, and a rerun skips the finished ones."""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

import dfkd
from dfkd.config import DistillConfig, ReconstructConfig, RecordConfig, Runtime
from dfkd.files import atomic_write, read_json, write_json
from dfkd.inversion import invert
from dfkd.leakage import class_means, picture, recovery
from dfkd.specs import DataRef, ModelRef, build_student, open_with_data
from dfkd.synthetic import SyntheticSet

QUIET = Runtime(progress=False)  # no bars, no epoch lines in a measurement

# model -> (student, objective, stats kinds, conv stats, reconstruction, distillation): each model's best
# objective at epsilon = inf on its own benchmark (the quick profile; benchmarks.own_model)
RECIPES = {
    "lenet5": dict(student="lenet5-half", objective="all-layers", kinds=("all-layers",), code=(),
                   rc=dict(n=5000, steps=40, batch_size=500),
                   dc=dict(epochs=30, batch_size=64, lr=1e-3, augment="affine")),
    "own": dict(student="examples/own_model.py:student", objective="all-layers+bn-stats", kinds=("all-layers",),
                code=("examples/own_model.py",), rc=dict(n=2000, steps=100, lr=0.2, jitter=2, tv=0.05),
                dc=dict(epochs=30, lr=1e-2)),
}


def cell(name: str, folder: Path, eps: float, seed: int, work: Path) -> dict:
    r = RECIPES[name]
    model, desc, data = open_with_data(ModelRef(str(folder / "teacher"), code=r["code"]), DataRef("mnist"))
    t0 = time.perf_counter()
    meta = dfkd.record(model, data, RecordConfig(kinds=r["kinds"], conv_stats="channel",
                                                 privacy=None if math.isinf(eps) else eps), rt=QUIET)
    rec_s = time.perf_counter() - t0
    out = work / f"{name}-eps{eps:g}-seed{seed}"
    dfkd.reconstruct(model, meta, out, ReconstructConfig(objective=r["objective"], seed=seed,
                                                        **r["rc"]), data.info, rt=QUIET)
    synth = SyntheticSet(out).open()
    torch.manual_seed(seed)
    student = build_student(r["student"], {}, data.info)
    hist = dfkd.distill(student, synth, model, DistillConfig(seed=seed, eval_every=r["dc"]["epochs"],
                                                             **r["dc"]), data, rt=QUIET)
    p = meta.header.get("privacy") or {}
    return {"model": name, "epsilon": eps, "seed": seed, "accuracy": hist[-1]["test_accuracy"],
            "claimed_epsilon": p.get("epsilon"), "delta": p.get("delta"), "record_seconds": rec_s,
            "seconds": time.perf_counter() - t0}


def leakage(folder: Path, eps: float, seed: int) -> tuple[dict, dict, object]:
    """Closed-form class means from the first layer's per-unit all-layers record, exact and private."""
    model, desc, data = open_with_data(ModelRef(str(folder / "teacher")), DataRef("mnist"))
    first = dfkd.taps.default_layers(model)[:1]
    truth = class_means(data.train, data.info, 10)
    out, images = {}, {"truth": truth}
    for label, e in (("unprotected", None), (f"epsilon {eps:g}", eps)):
        meta = dfkd.record(model, data, RecordConfig(kinds=("all-layers",), layers=tuple(first), conv_stats="unit",
                                                     privacy=e), rt=QUIET)
        inv = invert(model, meta)[0]
        est = inv.means.view(truth.shape)
        out[label] = recovery(est, truth)
        images[label] = est
    return out, images, data.info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks privacy", description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default="runs/quick", help="a finished dfkd run (its lenet5/teacher)")
    p.add_argument("--own", default=None, help="the own-model benchmark's folder (its teacher)")
    p.add_argument("--eps", default="inf,10,3,1,0.3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="docs/privacy")
    a = p.parse_args(argv)
    from dfkd.runtime import setup_threads
    setup_threads()
    out = Path(a.out)
    jpath = out.with_suffix(".json")
    done = read_json(jpath) if jpath.is_file() else {"cells": []}
    have = {(c["model"], c["epsilon"], c["seed"]) for c in done["cells"]}
    folders = {"lenet5": Path(a.run) / "lenet5"} | ({"own": Path(a.own)} if a.own else {})
    work = Path(a.run) / "privacy"
    for name, folder in folders.items():
        for eps in [float(e) for e in a.eps.split(",")]:
            for seed in [int(s) for s in a.seeds.split(",")]:
                if (name, eps, seed) in have:
                    continue
                c = cell(name, folder, eps, seed, work)
                print(f"{name} epsilon {eps:g} seed {seed}: {100 * c['accuracy']:.2f}% ({c['seconds']:.0f} s)", flush=True)
                done["cells"].append(c)
                write_json(jpath, done)
    if "leakage" not in done:
        report, images, info = leakage(folders["lenet5"], 1.0, 0)
        done["leakage"] = report
        picture(out.with_name(out.name + "-leakage.png"), images, info)
        write_json(jpath, done)
    atomic_write(out.with_suffix(".md"), table(done))
    plot(done, out.with_suffix(".png"))
    print(table(done))
    return done


def table(done: dict) -> str:
    lines = ["| model | epsilon | student % (mean of seeds) | spread (min..max) | seeds | vs epsilon = inf |",
             "|---|---|---|---|---|---|"]
    base = {}
    for name in dict.fromkeys(c["model"] for c in done["cells"]):
        for eps in sorted({c["epsilon"] for c in done["cells"] if c["model"] == name}, reverse=True):
            accs = [100 * c["accuracy"] for c in done["cells"] if c["model"] == name and c["epsilon"] == eps]
            m = statistics.mean(accs)
            base.setdefault(name, m)
            r = RECIPES[name]
            lines.append(f"| {name} -> {r['student'].rpartition(':')[2]} ({r['objective']}) | {eps:g} | {m:.2f} | "
                         f"{min(accs):.2f}..{max(accs):.2f} | {len(accs)} | {m - base[name]:+.2f} |")
    if "leakage" in done:
        lines += ["", "Class means recovered in closed form from LeNet-5's first-layer all-layers record per unit "
                  "(RMSE in raw pixel units, R^2 against the class-specific structure):", "",
                  "| file | RMSE | R^2 |", "|---|---|---|"]
        lines += [f"| {k} | {v['rmse']:.4f} | {v['r2']:.3f} |" for k, v in done["leakage"].items()]
    return "\n".join(lines) + "\n"


def plot(done: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(c["model"] for c in done["cells"]):
        eps = sorted({c["epsilon"] for c in done["cells"] if c["model"] == name})
        xs = [e if math.isfinite(e) else 100.0 for e in eps]
        accs = [[100 * c["accuracy"] for c in done["cells"] if c["model"] == name and c["epsilon"] == e] for e in eps]
        ax.errorbar(xs, [statistics.mean(v) for v in accs],
                    yerr=[[statistics.mean(v) - min(v) for v in accs], [max(v) - statistics.mean(v) for v in accs]],
                    marker="o", capsize=3, label=f"{name} -> {RECIPES[name]['student'].rpartition(':')[2]}")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (100 = no privacy)")
    ax.set_ylabel("student test accuracy %")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
