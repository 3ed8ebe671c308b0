"""Recording cost against one plain inference pass over the same 60,000 images, per network."""
from __future__ import annotations

import time

import torch

from dfkd.data import load_mnist, to_input
from dfkd.metadata import KINDS
from dfkd.models import build_model
from dfkd.record import record


def measure(name: str, batch_size: int = 1000) -> dict:
    data = load_mnist()
    torch.manual_seed(0)
    m = build_model(name).eval()
    x = to_input(data.train_x, m.input_shape)
    with torch.no_grad():
        m(x[:batch_size])
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            m(x[i:i + batch_size])
        infer = time.perf_counter() - t0
    out = {"model": name, "inference_s": infer}
    for kinds in [[k] for k in KINDS] + [list(KINDS)]:
        meta = record(m, data, kinds=kinds, batch_size=batch_size, progress=False)
        key = "all" if len(kinds) > 1 else kinds[0]
        out[f"{key}_pass_s"] = meta.timings["pass_seconds"]
        out[f"{key}_basis_s"] = meta.timings["basis_seconds"]
    out["ratio_all"] = out["all_pass_s"] / infer
    return out


def run() -> list[dict]:
    from .common import in_child
    rows = [in_child(measure, name) for name in ("lenet5", "hinton-1200")]
    print(f"{'model':<13}{'inference s':>12}" + "".join(f"{k + ' s':>17}" for k in KINDS)
          + f"{'all kinds s':>13}{'x inference':>12}{'bases s':>9}{'peak MB':>9}")
    for r in rows:
        print(f"{r['model']:<13}{r['inference_s']:>12.2f}" + "".join(f"{r[k + '_pass_s']:>17.2f}" for k in KINDS)
              + f"{r['all_pass_s']:>13.2f}{r['ratio_all']:>12.2f}{r['all_basis_s']:>9.2f}{r['peak_rss_mb']:>9.0f}")
    return rows
