"""``python -m benchmarks [train|record|all] [--json FILE]``: print the tables, optionally write JSON."""
from __future__ import annotations

import argparse

import torch

from . import bench_record, bench_train
from .common import dump, matmul_peak_gflops


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("which", nargs="?", default="all", choices=["train", "record", "all"])
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()
    from dfkd.runtime import setup_threads
    setup_threads()
    out = {"threads": torch.get_num_threads(), "matmul_peak_gflops": matmul_peak_gflops()}
    print(f"fp32 matmul peak, measured now: {out['matmul_peak_gflops']:.0f} GFLOP/s on {out['threads']} threads")
    if a.which in ("train", "all"):
        out["train"] = bench_train.run()
    if a.which in ("record", "all"):
        out["record"] = bench_record.run()
    dump(a.json, out)


if __name__ == "__main__":
    main()
