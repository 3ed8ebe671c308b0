"""Ablation: each technique of dfkd's recipe added in turn to the paper's losses, per objective and
network, at fixed compute.

``python -m benchmarks ablation [--run runs/quick] [--networks ...] [--objectives ...] [--images 2500]
[--steps 40] [--epochs 30] [--seed 0] [--out docs/ablation]`` takes the teachers and statistics of
a finished ``dfkd run`` and, per network and objective, climbs the ladder in ``LADDER``: the
paper's losses as written (plain squared distance, noise start, no augmentation), then
whitening, the profile's jitter prior, the class-mean start, affine views labelled by the
teacher, CutMix views. Every rung spends the same reconstruction (images x Adam steps) and the same
student steps (epochs x images / batch); a rung that changes nothing for a network (LeNet-5's
recipe has no jitter) is not rerun. Student accuracy is on the real test set against the true
labels, last epoch. Writes ``<out>.json`` (every cell as it finishes: a rerun skips finished
cells) and ``<out>.md`` (one row per network and objective, the gain of each rung)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import dfkd
from dfkd.config import DistillConfig, ReconstructConfig, Runtime
from dfkd.files import atomic_write, read_json, write_json
from dfkd.metadata import load
from dfkd.recipes import PAIRS, PAPER, PROFILES
from dfkd.runtime import setup_threads
from dfkd.sources import open_data
from dfkd.specs import build_student, stats_path
from dfkd.synthetic import SyntheticSet

QUIET = Runtime(progress=False)  # no bars, no epoch lines in a measurement

# rung name -> (reconstruction fields, distillation augment); each rung keeps the ones before it
LADDER = (
    ("paper", dict(whiten=False, init="noise", jitter=0), "none"),
    ("+ whitening", dict(whiten=True), "none"),
    ("+ jitter", dict(jitter="profile"), "none"),
    ("+ class-mean start", dict(init="auto"), "none"),
    ("+ affine views", {}, "affine"),
    ("+ cutmix views", {}, "affine+cutmix"),
)
OBJECTIVES = ("top-layer", "all-layers", "all-layers-dropout", "spectral-all", "spectral-pairs")


def rungs(net: str) -> list[tuple[str, dict, str]]:
    """The ladder for ``net``: each rung's full reconstruction fields and augment."""
    out, rc = [], {}
    for name, change, aug in LADDER:
        rc = dict(rc, **change)
        if rc.get("jitter") == "profile":
            rc["jitter"] = PROFILES["quick"]["recipe"][net].get("jitter", 0)
        out.append((name, dict(rc), aug))
    return out


def cell(run: Path, work: Path, net: str, objective: str, rc: dict, aug: str, a) -> dict:
    teacher, desc, info = dfkd.load_model(run / net / "teacher")
    meta = load(stats_path(run / net / "teacher"), desc["sha256"])
    data = open_data("mnist", info=info)
    key = "-".join(f"{k}{v}" for k, v in sorted(rc.items()))
    folder = work / f"{net}-{objective}-{key}-{a.images}x{a.steps}-seed{a.seed}"
    cfg = ReconstructConfig(objective=objective, n=a.images, steps=a.steps, batch_size=500, seed=a.seed, **rc)
    t0 = time.perf_counter()
    dfkd.reconstruct(teacher, meta, folder, cfg, info, rt=QUIET)
    synth = SyntheticSet(folder).open()
    recon_s = sum(s["seconds"] for s in synth.manifest["shards"])
    torch.manual_seed(a.seed)
    student = build_student(PAIRS[net], {}, info)
    dc = DistillConfig(epochs=a.epochs, batch_size=64, lr=1e-3, augment=aug, eval_every=a.epochs, seed=a.seed)
    t0 = time.perf_counter()
    hist = dfkd.distill(student, synth, teacher, dc, data, rt=QUIET)
    return {"accuracy": hist[-1]["test_accuracy"], "reconstruct_s": recon_s, "distill_s": time.perf_counter() - t0,
            "image_steps": a.images * a.steps, "student_steps": a.epochs * -(-a.images // 64)}


def table(res: dict, a) -> str:
    names = [n for n, _, _ in LADDER]
    lines = [f"Fixed compute per cell: {a.images:,} images x {a.steps} Adam steps "
             f"({a.images * a.steps:,} image-steps), {a.epochs} student epochs "
             f"({a.epochs * -(-a.images // 64):,} steps of 64); seed {a.seed}; last epoch, real MNIST test set.", "",
             "| network | objective | paper (Table 1) % | " + " | ".join(names) + " | total gain |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for net in a.networks:
        for obj in a.objectives:
            row = [res["cells"].get(f"{net}|{obj}|{n}") for n in names]
            if row[0] is None:
                continue
            txt, prev = [], None
            for c in row:
                if c is None:
                    txt.append("")
                    continue
                acc = 100 * c["accuracy"]
                if prev is None:
                    txt.append(f"{acc:.2f}")
                elif c.get("same_as"):
                    txt.append("(no change)")
                else:
                    txt.append(f"{acc:.2f} ({acc - prev:+.2f})")
                prev = acc
            paper = PAPER[net].get(obj)
            done = [c for c in row if c is not None]
            lines.append(f"| {net} | {obj} | {'' if paper is None else f'{paper:.2f}'} | " + " | ".join(txt)
                         + f" | {100 * (done[-1]['accuracy'] - done[0]['accuracy']):+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks ablation", description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default="runs/quick", help="a finished dfkd run (default: %(default)s)")
    p.add_argument("--networks", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--images", type=int, default=2500)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/ablation", help="(default: %(default)s)")
    a = p.parse_args(argv)
    setup_threads()
    run, out = Path(a.run), Path(a.out)
    work = run / "ablation"
    js = out.with_suffix(".json")
    res = read_json(js) if js.is_file() else {"cells": {}}
    res["args"] = vars(a)
    for net in a.networks:
        for obj in a.objectives:
            seen: dict[str, str] = {}
            for name, rc, aug in rungs(net):
                k = f"{net}|{obj}|{name}"
                same = seen.get(repr((rc, aug)))
                if same is not None:  # nothing changed for this network: the rung before, not rerun
                    res["cells"][k] = dict(res["cells"][f"{net}|{obj}|{same}"], same_as=same)
                elif k not in res["cells"]:
                    res["cells"][k] = dict(cell(run, work, net, obj, rc, aug, a), reconstruct=rc, augment=aug)
                    write_json(js, res)
                    print(f"{net} {obj} {name}: {100 * res['cells'][k]['accuracy']:.2f}%", flush=True)
                seen[repr((rc, aug))] = name
    write_json(js, res)
    atomic_write(out.with_suffix(".md"), "# Ablation: the recipe's techniques one by one\n\n" + table(res, a))
    print(table(res, a))
