"""Quality per compute: student accuracy against reconstruction compute (images x Adam steps)
and against student compute (distillation steps).

``python -m benchmarks curve [--budgets 2500x40,5000x40,10000x40] [--profile quick]`` runs the
pipeline (``dfkd run --no-baselines``) once per budget, every network and objective, sharing
one teacher per network (trained once under ``<out>/teachers``). A budget is IMAGESxSTEPS or
IMAGESxSTEPSxEPOCHS (distillation epochs; default: the profile's). Each run resumes where it
stopped. Writes ``<out>/curve.md`` (the table, with the cheapest budget that reaches the
paper's number per cell), ``curve.json`` and ``curve.png`` (per network: accuracy against
image-steps, and against student steps). ``--results FILE ...`` draws the same from finished
work instead (runs' ``results.json``, the ablation's JSON: its last rung), running nothing."""
from __future__ import annotations

import json
from pathlib import Path

from dfkd.files import atomic_write, read_json
from dfkd.objectives import OBJECTIVES
from dfkd.pipeline import run
from dfkd.results import cells
from dfkd.recipes import PAIRS, PAPER
from dfkd.run_config import RunConfig

from .ablation import LADDER


def parse_budgets(text: str) -> list[tuple[int, int, int | None]]:
    out = []
    for part in text.split(","):
        bits = part.strip().split("x")
        if not (len(bits) in (2, 3) and all(b.isdigit() for b in bits) and int(bits[0]) > 0
                and (len(bits) == 2 or int(bits[2]) > 0)):
            raise SystemExit(f"dfkd: --budgets: {part!r} is not IMAGESxSTEPS[xEPOCHS], e.g. 5000x40 or 5000x40x60")
        out.append((int(bits[0]), int(bits[1]), int(bits[2]) if len(bits) == 3 else None))
    return out


def _name(n: int, steps: int, epochs: int | None) -> str:
    return f"{n}x{steps}" + (f"x{epochs}" if epochs else "")


def sweep(out: str, budgets: list[tuple[int, int, int | None]], networks: list[str], teachers: str | None = None,
          seed: int = 0, profile: str = "quick") -> list[dict]:
    rows = []
    for n, steps, epochs in budgets:
        res = run(RunConfig(out=f"{out}/{_name(n, steps, epochs)}", profile=profile, networks=tuple(networks),
                            teachers=teachers or f"{out}/teachers", images=n, steps=steps, epochs=epochs,
                            baselines=False, seed=seed))
        for r in read_json(res)["rows"]:  # run() gives every row, resumed or not, today's paper figure
            rows.append({k: r[k] for k in ("teacher", "student", "objective", "accuracy", "paper_accuracy",
                                           "image_steps", "student_steps", "seconds")}
                        | {"budget": _name(n, steps, epochs)})
    return rows


def table(rows: list[dict]) -> str:
    budgets = list(dict.fromkeys(r["budget"] for r in sorted(rows, key=lambda r: (r["image_steps"], r["student_steps"]))
                                 if r["image_steps"]))
    lines = ["| teacher | objective | paper % | " + " | ".join(budgets)
             + " | cheapest at or above the paper |", "|---|---|---|" + "---|" * (len(budgets) + 1)]
    for net in dict.fromkeys(r["teacher"] for r in rows):
        for obj in dict.fromkeys(r["objective"] for r in rows if r["teacher"] == net):
            cell = {r["budget"]: r for r in rows if r["teacher"] == net and r["objective"] == obj}
            paper = next(iter(cell.values()))["paper_accuracy"]
            accs = [f"{100 * cell[b]['accuracy']:.2f}" if b in cell else "" for b in budgets]
            ok = [b for b in budgets if b in cell and paper is not None and cell[b]["accuracy"] >= paper]
            best = "no paper figure" if paper is None else (
                f"{ok[0]} ({cell[ok[0]]['image_steps']:,} image-steps, {cell[ok[0]]['student_steps']:,} student steps)"
                if ok else "none of these")
            lines.append(f"| {net} | {obj} | {'' if paper is None else f'{100 * paper:.2f}'} | "
                         + " | ".join(accs) + f" | {best} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Per network (columns): accuracy against image-steps (top) and against student steps (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["teacher"] for r in rows))
    fig, axes = plt.subplots(2, len(nets), figsize=(6 * len(nets), 9), squeeze=False)
    for col, net in enumerate(nets):
        # noise spends no reconstruction compute: it is in the table, not on these axes
        objs = [o for o in OBJECTIVES if OBJECTIVES[o].kind and any(r["objective"] == o and r["teacher"] == net
                                                                   for r in rows)]
        shown = [100 * r[k] for r in rows if r["teacher"] == net and r["objective"] in objs
                 for k in ("accuracy", "paper_accuracy") if r[k] is not None]
        for ax, axis, label in ((axes[0][col], "image_steps", "reconstruction compute (images x Adam steps)"),
                                (axes[1][col], "student_steps", "student compute (distillation steps of 64)")):
            for k, obj in enumerate(objs):
                pts = sorted((r[axis], 100 * r["accuracy"]) for r in rows if r["teacher"] == net and r["objective"] == obj)
                paper = next(r["paper_accuracy"] for r in rows if r["teacher"] == net and r["objective"] == obj)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{k}", label=obj)
                if paper is not None:
                    ax.axhline(100 * paper, color=f"C{k}", ls=":", lw=1)
            ax.set_ylim(min(shown) - 2, min(100, max(shown) + 2))  # the paper's lines included
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("student test accuracy (%)")
            ax.set_title(f"{net} -> {PAIRS[net]} (dotted: the paper)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def from_results(paths: list[str]) -> list[dict]:
    """Curve rows from finished work instead of new runs: a ``dfkd run``'s ``results.json`` (its
    objective rows, seeds averaged) or the ablation's JSON (its last rung: the full recipe)."""
    rows = []
    for path in paths:
        res = read_json(Path(path))
        if "cells" in res and isinstance(res["cells"], dict):  # benchmarks.ablation
            a = res["args"]
            last = next(reversed(LADDER))[0]
            for key, c in res["cells"].items():
                net, obj, rung = key.split("|")
                if rung == last:
                    rows.append({"teacher": net, "student": PAIRS[net], "objective": obj, "accuracy": c["accuracy"],
                                 "paper_accuracy": PAPER[net].get(obj) and PAPER[net][obj] / 100,
                                 "image_steps": c["image_steps"], "student_steps": c["student_steps"],
                                 "seconds": {"reconstruct": c["reconstruct_s"], "distill": c["distill_s"]},
                                 "budget": f"{a['images']}x{a['steps']}x{a['epochs']}"})
            continue
        cfg, prof = res["config"], res["profile"]
        for c in cells(res["rows"]):
            if not c["image_steps"]:
                continue
            rec = dict(prof["recipe"][c["teacher"]])
            n, steps = cfg["images"] or rec["n"], rec["steps"] if cfg["steps"] is None else cfg["steps"]
            epochs = cfg.get("epochs") or prof["distill"]["epochs"]
            rows.append({k: c[k] for k in ("teacher", "student", "objective", "accuracy", "paper_accuracy",
                                           "image_steps", "seconds")}
                        | {"student_steps": epochs * -(-n // prof["distill"]["batch_size"]),
                           "budget": f"{n}x{steps}x{epochs}"})
    return rows


def main(out: str, budgets: str, networks: list[str], teachers: str | None = None, profile: str = "quick",
         results: list[str] | None = None) -> None:
    rows = from_results(results) if results else sweep(out, parse_budgets(budgets), networks, teachers, profile=profile)
    md = table(rows)
    atomic_write(Path(out) / "curve.md", "# Student accuracy (%) against reconstruction and student compute\n\n" + md)
    atomic_write(Path(out) / "curve.json", json.dumps(rows, indent=2) + "\n")
    try:
        plot(rows, Path(out) / "curve.png")
        print(f"wrote {out}/curve.png")
    except ImportError:
        print("matplotlib is not installed: no curve.png (pip install matplotlib, or make bench)")
    print(md)
