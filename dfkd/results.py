"""``dfkd run``'s results: ``results.json`` (``rows``, one per student; ``cells``, per teacher and objective the
seeds' mean, min and max) and ``results.md``, the table with the paper's numbers beside ours."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import RunConfig, to_dict
from .errors import DfkdError
from .files import atomic_write, read_bytes, read_json, write_json
from .profiles import DAFL_NOISE, PROFILES


def cells(rows: list[dict]) -> list[dict]:
    """One entry per (teacher, objective): the seeds and their accuracies, the mean, min and max, and the
    mean seconds per stage."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["objective"]), []).append(r)
    out = []
    for runs in groups.values():
        accs = [r["accuracy"] for r in runs]
        c = {k: runs[0][k] for k in ("teacher", "student", "objective", "teacher_accuracy", "paper_accuracy",
                                     "image_steps")}
        c.update(seeds=[r.get("seed", 0) for r in runs], accuracies=accs, accuracy=sum(accs) / len(accs),
                 min=min(accs), max=max(accs),
                 seconds={k: sum(r["seconds"].get(k, 0.0) for r in runs) / len(runs) for k in runs[0]["seconds"]})
        out.append(c)
    return out


def paper_data(cfg: RunConfig) -> bool:
    """Whether the run is on the data the paper measured on (the bundled MNIST): only then do the paper's
    figures (and DAFL's noise baseline) stand beside its networks' rows."""
    return cfg.data == "mnist"


def table(rows: list[dict], paper: bool = True) -> str:
    """The results table; ``paper``: with the paper's figures beside ours (on the paper's data only)."""
    head = "| teacher | student | objective | accuracy % | spread (min..max) | seeds |" + (
        " paper % | vs paper |" if paper else "") + " share of teacher % | reconstruct s | distill/train s | image-steps |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for c in cells(rows):
        s, fig, acc = c["seconds"], c["paper_accuracy"], c["accuracy"]
        ptxt = "" if fig is None else f"{100 * fig:.2f}"
        dtxt = "" if fig is None else f"{100 * (acc - fig):+.2f}"
        spread = f"{100 * c['min']:.2f}..{100 * c['max']:.2f}" if len(c["accuracies"]) > 1 else ""
        lines.append(
            f"| {c['teacher']} | {c['student']} | {c['objective']} | {100 * acc:.2f} | {spread} | {len(c['accuracies'])} "
            + (f"| {ptxt} | {dtxt} " if paper else "")
            + f"| {100 * acc / c['teacher_accuracy']:.1f} | {s.get('reconstruct', 0):.0f} | "
            f"{s.get('distill', s.get('train', 0)):.0f} | {c['image_steps']:,} |")
    stages = {}
    for r in rows:
        s = stages.setdefault(r["teacher"], {"train teacher": 0.0, "record": 0.0})
        s["train teacher"] = max(s["train teacher"], r["seconds"].get("teacher_train", 0.0))
        s["record"] = max(s["record"], r["seconds"].get("record", 0.0))
    lines.append("")
    lines += [f"{t}: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()) + "  " for t, s in stages.items()]
    if paper:
        lines.append("noise: the paper has no noise baseline; DAFL's, with other noise, reports "
                     + ", ".join(f"{v:.2f}% ({k})" for k, v in DAFL_NOISE.items()) + ".")
    return "\n".join(lines) + "\n"


HOW = ("device", "progress", "restart")  # how a run runs, not what it made


def _made(doc: dict) -> dict:
    """A results document without the config fields of how its run ran."""
    config = doc.get("config")
    return dict(doc, config={k: v for k, v in config.items() if k not in HOW} if isinstance(config, dict) else config)


def _old(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except DfkdError:  # damaged: written again
        return None


def write_results(out: Path, rows: list[dict], cfg: RunConfig, t0: float, final: bool = True,
                  class_names: tuple[str, ...] | None = None) -> None:
    """Write results.json and results.md. A file that already holds exactly what it would be written with
    is left as it was (a run resumed after its last student rewrites nothing), and both state one wall time:
    results.json's, when it is kept. A write on the way (``final`` False) never shrinks the results: results
    of this config (but for how it runs) holding more rows than ``rows`` (a resumed run, its later students finished) wait for
    the final write. Both name the data (its spec and class names); the paper's figures stand beside the
    rows on the paper's data only (``paper_data``)."""
    data = {"spec": cfg.data, "class_names": list(class_names) if class_names else None}
    doc = json.loads(json.dumps({"config": to_dict(cfg), "profile": PROFILES[cfg.profile], "data": data,
                                 "rows": rows, "cells": cells(rows)}))
    old = _old(out / "results.json")
    if not final and old is not None and _made(old)["config"] == _made(doc)["config"] \
            and isinstance(old.get("rows"), list) and len(old["rows"]) > len(rows):
        return
    wall = old.pop("wall_seconds", None) if old is not None else None
    # the same results, however this run runs (device, progress bars, restart), and a file from before "data"
    rows_kept = old is not None and {k: v for k, v in _made(old).items() if k != "data"} == \
        {k: v for k, v in _made(doc).items() if k != "data"}
    wall = float(wall) if rows_kept and isinstance(wall, (int, float)) and not isinstance(wall, bool) else None
    if wall is None or _made(old) != _made(doc):
        wall = time.perf_counter() - t0 if wall is None else wall
        write_json(out / "results.json", dict(doc, wall_seconds=wall))
    seeds = f", mean of {cfg.seeds} seeds" if cfg.seeds > 1 else ""
    names = f" ({len(class_names)} classes: {', '.join(class_names)})" if class_names else ""
    what = "MNIST, test accuracy on its 10,000 real test images" if paper_data(cfg) else \
        f"`{cfg.data}`{names}, test accuracy on its real test split"
    md = (f"# dfkd results: {what} against the true labels, last epoch{seeds}\n\n"
          + table(rows, paper_data(cfg)) + f"\nwall time so far: {wall:.0f} s\n").encode()
    try:
        same = (out / "results.md").is_file() and read_bytes(out / "results.md", "results.md") == md
    except DfkdError:
        same = False
    if not same:
        atomic_write(out / "results.md", md)
