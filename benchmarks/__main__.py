"""``python -m benchmarks [STAGE ...] [--networks ...] [--json FILE]``; ``python -m benchmarks curve``

Prints one table: per stage and network the throughput, the GFLOP/s counted from the layer
shapes, that as a share of this machine's fp32 matmul peak measured in the same run, the
ratio to the stage's own reference measured in the same process, and the peak memory of
the process that ran it. Writes the same figures as JSON."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from dfkd.kinds import KINDS
from dfkd.objectives import OBJECTIVES
from dfkd.recipes import PAIRS

from . import bench_distill, bench_evaluate, bench_reconstruct, bench_record, bench_train
from .common import dump, in_child, matmul_peak_gflops

STAGES = ("train", "record", "reconstruct", "distill", "evaluate")


def _rows(stage: str, net: str, peak: float) -> list[dict]:
    if stage == "train":
        return [in_child(bench_train.measure, net)]
    if stage == "record":
        rows = in_child(bench_record.measure, net)
        if net == list(PAIRS)[-1]:  # once: the conv-net row on a model dfkd did not define
            rows += in_child(bench_record.measure, "own")
        return rows
    if stage == "reconstruct":
        rows = []
        for k, obj in enumerate(o for o in OBJECTIVES if OBJECTIVES[o].kind in KINDS):  # the kinds recorded by default
            got = in_child(bench_reconstruct.measure, net, obj, peak)
            rows += got if k == 0 else got[-1:]  # the plain reference once per network
        return rows
    if stage == "distill":
        return in_child(bench_distill.measure, net)
    return [in_child(bench_evaluate.measure, n) for n in (net, PAIRS[net])]


def _print(rows: list[dict], peak: float) -> None:
    head = f"{'network':<24}{'stage':<12}{'what':<34}{'rate':>10} {'unit':<14}{'GFLOP/s':>8}{'% peak':>8}" \
           f"{'ratio':>7}  {'target':<30}{'met':<5}{'peak MB':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"{r['network']:<24}{r['stage']:<12}{r['what'][:33]:<34}{r['rate']:>10,.0f} {r['unit']:<14}"
              f"{r['gflops']:>8.1f}{100 * r['gflops'] / peak:>7.0f}%{ratio:>7}  {r['target']:<30}{met:<5}"
              f"{r['peak_rss_mb']:>8.0f}")


def curve_main(argv: list[str]) -> None:
    from . import curve
    p = argparse.ArgumentParser(prog="python -m benchmarks curve", description=curve.__doc__.split("\n\n")[1])
    p.add_argument("--budgets", default="2500x40,5000x40,10000x40", help="IMAGESxSTEPS[xEPOCHS],... (default: %(default)s)")
    p.add_argument("--profile", default="quick", help="the recipe the budgets scale (default: %(default)s)")
    p.add_argument("--networks", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--out", default="runs/curve", help="(default: %(default)s)")
    p.add_argument("--teachers", default=None, help="an earlier run directory whose teachers to use "
                   "(default: train them once under OUT/teachers)")
    p.add_argument("--results", nargs="+", default=None, help="draw from these results.json / ablation JSON files "
                   "instead of running")
    a = p.parse_args(argv)
    curve.main(a.out, a.budgets, a.networks, a.teachers, a.profile, a.results)


def main() -> None:
    if sys.argv[1:2] == ["curve"]:
        return curve_main(sys.argv[2:])
    if sys.argv[1:2] == ["scale"]:
        from . import scale
        scale.main(sys.argv[2:])
        return None
    if sys.argv[1:2] == ["leakage"]:
        from . import leakage
        leakage.main(sys.argv[2:])
        return None
    if sys.argv[1:2] == ["ablation"]:
        from . import ablation
        ablation.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["privacy"]:
        from . import privacy
        privacy.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["deploy"]:
        from . import deploy
        deploy.main(sys.argv[2:])
        return None
    if sys.argv[1:2] == ["cpu-steps"]:
        from . import cpu_steps
        cpu_steps.main(sys.argv[2:])
        return None
    if sys.argv[1:2] == ["own"]:
        from . import own_model
        own_model.main(sys.argv[2:])
        return None
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("stages", nargs="*", metavar="STAGE", help=f"any of {', '.join(STAGES)} (default: all)")
    p.add_argument("--networks", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--json", default="runs/benchmarks.json", help="where to write the figures (default: %(default)s)")
    a = p.parse_args()
    bad = [s for s in a.stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    from dfkd.runtime import setup_threads
    setup_threads()
    t0 = time.perf_counter()
    peak0 = matmul_peak_gflops()
    print(f"fp32 matmul peak, measured now: {peak0:.0f} GFLOP/s on {torch.get_num_threads()} threads", flush=True)
    rows = []
    for stage in a.stages or STAGES:
        for net in a.networks:
            rows += _rows(stage, net, peak0)
            print(f"  {stage} {net} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    peak1 = matmul_peak_gflops()
    peak = max(peak0, peak1)  # the attainable peak: shares are conservative
    for r in rows:
        r["peak_share"] = r["gflops"] / peak
    print(f"fp32 matmul peak at the end: {peak1:.0f} GFLOP/s; shares below use {peak:.0f}\n")
    _print(rows, peak)
    dump(a.json, {"threads": torch.get_num_threads(), "matmul_peak_gflops": peak, "peak_start": peak0,
                  "peak_end": peak1, "seconds": time.perf_counter() - t0, "rows": rows})


if __name__ == "__main__":
    main()
