"""Quality per compute: student accuracy against reconstruction compute (images x steps).

``python -m benchmarks curve [--budgets 2500x40,5000x40,10000x40]`` runs the pipeline
(``dfkd run --no-baselines``) once per budget, every network and objective, sharing one
teacher per network (trained once under ``<out>/teachers``). Each run resumes where it
stopped. Writes ``<out>/curve.md`` (the table, with the cheapest budget that reaches the
paper's number per cell), ``curve.json`` and ``curve.png``."""
from __future__ import annotations

import json
from pathlib import Path

from dfkd.checkpoint import atomic_write, read_json
from dfkd.objectives import OBJECTIVES
from dfkd.pipeline import PAIRS, RunConfig, run


def parse_budgets(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, _, steps = part.strip().partition("x")
        if not (n.isdigit() and steps.isdigit() and int(n) > 0):
            raise SystemExit(f"dfkd: --budgets: {part!r} is not IMAGESxSTEPS, e.g. 5000x40")
        out.append((int(n), int(steps)))
    return out


def sweep(out: str, budgets: list[tuple[int, int]], networks: list[str], teachers: str | None = None,
          seed: int = 0) -> list[dict]:
    rows = []
    for n, steps in budgets:
        res = run(RunConfig(out=f"{out}/{n}x{steps}", networks=tuple(networks), teachers=teachers or f"{out}/teachers",
                            images=n, steps=steps, baselines=False, seed=seed))
        for r in read_json(res)["rows"]:  # run() gives every row, resumed or not, today's paper figure
            rows.append({k: r[k] for k in ("teacher", "student", "objective", "accuracy", "paper_accuracy",
                                           "image_steps", "seconds")} | {"images": n, "steps": steps})
    return rows


def table(rows: list[dict]) -> str:
    budgets = sorted({(r["images"], r["steps"]) for r in rows}, key=lambda b: b[0] * b[1])
    lines = ["| teacher | objective | paper % | " + " | ".join(f"{n}x{s}" for n, s in budgets)
             + " | cheapest at or above the paper |", "|---|---|---|" + "---|" * (len(budgets) + 1)]
    for net in dict.fromkeys(r["teacher"] for r in rows):
        for obj in dict.fromkeys(r["objective"] for r in rows if r["teacher"] == net):
            cell = {(r["images"], r["steps"]): r for r in rows if r["teacher"] == net and r["objective"] == obj}
            paper = next(iter(cell.values()))["paper_accuracy"]
            accs = [f"{100 * cell[b]['accuracy']:.2f}" if b in cell else "" for b in budgets]
            ok = [b for b in budgets if b in cell and paper is not None and cell[b]["accuracy"] >= paper]
            best = "no paper figure" if paper is None else (f"{ok[0][0]}x{ok[0][1]} ({ok[0][0] * ok[0][1]:,} "
                                                            "image-steps)" if ok else "none of these")
            lines.append(f"| {net} | {obj} | {'' if paper is None else f'{100 * paper:.2f}'} | "
                         + " | ".join(accs) + f" | {best} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["teacher"] for r in rows))
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    for ax, net in zip(axes[0], nets):
        # noise spends no reconstruction compute: it is in the table, not on this axis
        objs = [o for o in OBJECTIVES if OBJECTIVES[o].kind and any(r["objective"] == o and r["teacher"] == net
                                                                   for r in rows)]
        for k, obj in enumerate(objs):
            pts = sorted((r["image_steps"], 100 * r["accuracy"], r["paper_accuracy"])
                         for r in rows if r["teacher"] == net and r["objective"] == obj)
            color = f"C{k}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=obj)
            if pts[0][2] is not None:
                ax.axhline(100 * pts[0][2], color=color, ls=":", lw=1)
        shown = [100 * r[k] for r in rows if r["teacher"] == net and r["objective"] in objs
                 for k in ("accuracy", "paper_accuracy") if r[k] is not None]
        ax.set_ylim(min(shown) - 2, max(shown) + 2)  # the paper's lines included
        ax.set_xscale("log")
        ax.set_xlabel("reconstruction compute (images x Adam steps)")
        ax.set_ylabel("student test accuracy (%)")
        ax.set_title(f"{net} -> {PAIRS[net]} (dotted: the paper)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(out: str, budgets: str, networks: list[str], teachers: str | None = None) -> None:
    rows = sweep(out, parse_budgets(budgets), networks, teachers)
    md = table(rows)
    atomic_write(Path(out) / "curve.md", "# Student accuracy (%) against reconstruction compute\n\n" + md)
    atomic_write(Path(out) / "curve.json", json.dumps(rows, indent=2) + "\n")
    try:
        plot(rows, Path(out) / "curve.png")
        print(f"wrote {out}/curve.png")
    except ImportError:
        print("matplotlib is not installed: no curve.png (pip install matplotlib, or make bench)")
    print(md)
