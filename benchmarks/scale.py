"""Processes against threads on one machine: ``torchrun`` with 2 processes x 1 thread against 1
process x 2 threads, for reconstruction and distillation, measured in the same run.

``python -m benchmarks scale [--run runs/quick] [--networks lenet5 hinton-1200] [--images N]
[--steps S] [--epochs E]`` uses the teachers and statistics of a finished ``dfkd run`` and runs
each command as a user would (``dfkd ...`` and ``torchrun --standalone --nproc-per-node 2 -m
dfkd ...``). Reconstruction is timed from the shards' own seconds (the work, start-up excluded:
one process's sum against the slower rank's sum) and by the wall clock of the whole command,
with 1 process x 1 thread as a third reference; distillation by its epochs' own seconds and by
the wall clock, with each student's test accuracy. Prints one table; writes
``<out>/scale.json``."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dfkd.files import read_json, write_json
from dfkd.recipes import PAIRS, PROFILES

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(cmd: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DFKD_DIST_INIT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"benchmarks: {' '.join(cmd[:6])}...: {r.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def _work_seconds(folder: Path) -> float:
    """The reconstruction's working time: the sum of shard seconds, per rank for a split run."""
    timings = list(folder.glob("timings-rank*.json"))
    if not timings:
        return sum(s["seconds"] for s in read_json(folder / "manifest.json")["shards"])
    return max(sum(read_json(t).values()) for t in timings)


def measure(run: Path, net: str, out: Path, images: int, steps: int, epochs: int) -> list[dict]:
    teacher = str(run / net / "teacher")
    jitter = PROFILES["quick"]["recipe"][net].get("jitter", 0)
    dfkd = [sys.executable, "-m", "dfkd"]
    rec = ["reconstruct", "--teacher", teacher, "--objective", "all-layers", "--images", str(images), "--steps",
           str(steps), "--jitter", str(jitter), "--batch-size", "250", "--quiet"]
    rows = []
    sets = {}
    for how, prefix, threads in (("1 process x 1 thread", dfkd, 1), ("1 process x 2 threads", dfkd, 2),
                                 ("2 processes x 1 thread", TORCHRUN + ["-m", "dfkd"], 1)):
        d = out / net / f"set-{how.replace(' ', '')}"
        shutil.rmtree(d, ignore_errors=True)
        wall = _run(prefix + rec + ["--out", str(d)], threads)
        sets[how] = d
        rows.append({"network": net, "stage": "reconstruct", "how": how, "wall_s": wall, "work_s": _work_seconds(d),
                     "rate": images * steps / _work_seconds(d)})
    one, two = sets["1 process x 1 thread"], sets["2 processes x 1 thread"]  # one thread a process: the same bytes
    same = all((one / f.name).read_bytes() == f.read_bytes() for f in two.glob("shard-*.safetensors"))
    dist = ["distill", "--synthetic", str(two), "--teacher", teacher, "--student", PAIRS[net], "--epochs",
            str(epochs), "--batch-size", "64", "--lr", "1e-3", "--augment", "affine", "--quiet"]
    for how, prefix, threads in (("1 process x 2 threads", dfkd, 2), ("2 processes x 1 thread", TORCHRUN + ["-m", "dfkd"], 1)):
        stem = out / net / f"student-{threads}"
        for f in stem.parent.glob(stem.name + "*"):
            f.unlink()
        wall = _run(prefix + dist + ["--out", str(stem)], threads)
        desc = read_json(stem.with_name(stem.name + ".json"))
        work = sum(h["seconds"] for h in desc["history"])  # the epochs themselves, start-up excluded
        rows.append({"network": net, "stage": "distill", "how": how, "wall_s": wall, "work_s": work,
                     "rate": images * epochs / work, "accuracy": desc["test_accuracy"]})
    for stage in ("reconstruct", "distill"):  # 2 processes x 1 thread against 1 process x 2 threads
        got = {r["how"]: r for r in rows if r["stage"] == stage}
        a, b = got["1 process x 2 threads"], got["2 processes x 1 thread"]
        b["ratio"], b["wall_ratio"] = b["rate"] / a["rate"], a["wall_s"] / b["wall_s"]
        if "1 process x 1 thread" in got:
            c = got["1 process x 1 thread"]
            a["ratio_to_one_thread"], b["ratio_to_one_thread"] = a["rate"] / c["rate"], b["rate"] / c["rate"]
    rows[2]["shards_identical"] = same
    return rows


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default="runs/quick", help="a finished dfkd run (its teachers) (default: %(default)s)")
    p.add_argument("--networks", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="runs/scale")
    a = p.parse_args(argv)
    rows = []
    print(f"{'network':<13}{'stage':<13}{'how':<25}{'wall s':>8}{'work s':>8}{'rate':>10}  {'ratio':>6}"
          f"{'wall ratio':>11}{'vs 1x1':>8}{'student %':>10}")
    for net in a.networks:
        got = measure(Path(a.run), net, Path(a.out), a.images, a.steps, a.epochs)
        for r in got:
            unit = "img-steps/s" if r["stage"] == "reconstruct" else "img-epochs/s"
            acc = f"{100 * r['accuracy']:.2f}" if "accuracy" in r else ""
            print(f"{r['network']:<13}{r['stage']:<13}{r['how']:<25}{r['wall_s']:>8.1f}{r['work_s']:>8.1f}"
                  f"{r['rate']:>10.0f}  {_x(r.get('ratio')):>6}{_x(r.get('wall_ratio')):>11}"
                  f"{_x(r.get('ratio_to_one_thread')):>8}{acc:>10}  {unit}")
        print(f"{net}: shards of 2 processes x 1 thread identical to 1 process x 1 thread's: "
              f"{got[2]['shards_identical']}")
        rows += got
    write_json(Path(a.out) / "scale.json", {"args": vars(a), "rows": rows})
    return rows


