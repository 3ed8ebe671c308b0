"""``dfkd run``'s results: ``results.json`` (``rows``, one per student; ``cells``, per teacher and objective the
seeds' mean, min and max) and ``results.md``, the report: the table with the paper's numbers beside ours (on
its data), the command that makes it again, the students' accuracy curve (``curve.svg``) and a grid of each
synthetic set's images."""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import fields
from pathlib import Path

from . import budget
from .averaging import epochs_averaged
from .config import default, flag, to_dict
from .errors import DfkdError
from .files import atomic_write, read_bytes, read_json, write_json
from .profiles import OWN_FLAGS, generator_recipe
from .recipes import DAFL_NOISE, GENERATOR, OWN, PROFILES
from .run_config import RunConfig


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
        if "synthesis" in runs[0]:  # a generator's rows (a cell written before the mode has no such key)
            c["synthesis"] = runs[0]["synthesis"]
        out.append(c)
    return out


def paper_data(cfg: RunConfig) -> bool:
    """Whether the run is on the data the paper measured on (the bundled MNIST): only then do the paper's
    figures (and DAFL's noise baseline) stand beside its networks' rows, never beside a user's own pair."""
    return cfg.data == "mnist" and cfg.student is None


def table(rows: list[dict], paper: bool = True) -> str:
    """The results table; ``paper``: with the paper's figures beside ours (on the paper's data only)."""
    gen = any(r.get("synthesis") == "generator" for r in rows)
    head = "| teacher | student | objective | accuracy % | spread (min..max) | seeds |" + (
        " paper % | vs paper |" if paper else "") + " share of teacher % | " + \
        ("generate s |" if gen else "reconstruct s |") + " distill/train s | image-steps |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for c in cells(rows):
        s, fig, acc = c["seconds"], c["paper_accuracy"], c["accuracy"]
        ptxt = "" if fig is None else f"{100 * fig:.2f}"
        dtxt = "" if fig is None else f"{100 * (acc - fig):+.2f}"
        spread = f"{100 * c['min']:.2f}..{100 * c['max']:.2f}" if len(c["accuracies"]) > 1 else ""
        lines.append(
            f"| {_md(c['teacher'])} | {_md(c['student'])} | {c['objective']}"
            + (" (generator)" if c.get("synthesis") == "generator" else "")
            + f" | {100 * acc:.2f} | {spread} | {len(c['accuracies'])} "
            + (f"| {ptxt} | {dtxt} " if paper else "")
            + f"| {100 * acc / c['teacher_accuracy']:.1f} | {s.get('reconstruct', s.get('generate', 0)):.0f} | "
            f"{s.get('distill', s.get('train', 0)):.0f} | {c['image_steps']:,} |")
    stages = {}
    for r in rows:
        s = stages.setdefault(r["teacher"], {"train teacher": 0.0, "record": 0.0})
        s["train teacher"] = max(s["train teacher"], r["seconds"].get("teacher_train", 0.0))
        s["record"] = max(s["record"], r["seconds"].get("record", 0.0))
        if isinstance(r.get("colour"), dict) and isinstance(r["colour"].get("seconds"), (int, float)):
            s["colour probe"] = max(s.get("colour probe", 0.0), r["colour"]["seconds"])
    lines.append("")
    lines += [f"{_md(t)}: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()) + "  " for t, s in stages.items()]
    lines += colour_lines(rows) + averaged_lines(rows) + budget.lines(rows)
    if paper:
        lines.append("noise: the paper has no noise baseline; DAFL's, with other noise, reports "
                     + ", ".join(f"{v:.2f}% ({k})" for k, v in DAFL_NOISE.items()) + ".")
    return "\n".join(lines) + "\n"


RUNS = ("device", "progress", "restart")  # how a run runs
HOW = RUNS + ("code",)  # and the code it may import: not what it made
# the fields of a user's own pair: a results document leaves them out where unset, as one written before them did
OWN_FIELDS = OWN_FLAGS + ("student", "code")


LATER_FIELDS = ("synthesis", "iterations", "export")  # and these where they hold their default


def _config(cfg: RunConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if not (k in OWN_FIELDS and v in (None, [], ()))
            and not (k in LATER_FIELDS and v == default(RunConfig, k))}


def command(cfg: RunConfig) -> str:
    """The ``dfkd run`` command that makes these results again: every field that is not its default (but for
    how the run ran), spelt by its flag."""
    words = ["dfkd", "run"]
    for f in fields(RunConfig):
        v = getattr(cfg, f.name)
        if f.name in RUNS or v == f.default:
            continue
        spelt = flag(f) or "--" + f.name  # code: the --code flag every verb shares, once per file
        if isinstance(v, bool):
            words.append(spelt)
        elif f.name == "code":
            words += [w for c in v for w in ("--code", c)]
        else:
            words += [spelt, ",".join(v) if isinstance(v, tuple) else str(v)]
    return " ".join(shlex.quote(w) for w in words)


def _label(r: dict, rows: list[dict]) -> str:
    """A student's name in the report: its objective and seed, and its teacher where the run has several."""
    many = len({x["teacher"] for x in rows}) > 1
    return (f"{r['teacher']} " if many else "") + f"{r['objective']} seed {r.get('seed', 0)}"


def _md(text: str) -> str:
    """Text set in a Markdown table or line: no cell break, code span or HTML from the data's names."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("`", "'").replace("<", "&lt;")


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _own(r: dict) -> dict:
    """A row's own-weights accuracies while its student is an average (``--average``), or {} where it has none."""
    own = r.get("running") if isinstance(r.get("running"), dict) else {}
    return own if own.get("epochs") and len(own["epochs"]) == len(own.get("accuracy") or ()) else {}


def curve(rows: list[dict], width: int = 720) -> bytes:
    """The students' test accuracy along their training as an SVG line chart, one line (and legend entry) per
    student, from its first measured epoch (every ``eval_every`` epochs and the last, which a dot marks);
    0..100 %. Beside a generator's student (measured every so many generator steps), each line spans its own
    budget. A student kept as its weights' average (``--average``) also gets its own weights' accuracy over the
    averaged epochs, dashed, its last point a ring ("- - own" in the legend)."""
    runs = [r for r in rows if r.get("history") and r.get("history_epochs")]
    last = max([e for r in runs for e in r["history_epochs"]] or [1])
    height = max(320, 48 + 16 * len(runs))
    left, bottom, top, right = 48, height - 32, 16, width - 260
    def x(e): return left + (right - left) * e / max(last, 1)  # noqa: E704
    def y(a): return bottom - (bottom - top) * a  # noqa: E704
    def points(es, accs, scale): return [(f"{x(e * scale):.1f}", f"{y(a):.1f}") for e, a in zip(es, accs)]  # noqa: E704
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for a in range(0, 101, 20):
        out.append(f'<line x1="{left}" x2="{right}" y1="{y(a / 100):.1f}" y2="{y(a / 100):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y(a / 100) + 4:.1f}" text-anchor="end">{a}%</text>')
    mixed = any(r.get("synthesis") == "generator" for r in runs)  # epochs and generator steps: each its own share
    axis = "share of each student's budget (its epochs, or its generator steps)" if mixed else f"epoch (of {last})"
    out.append(f'<text x="{(left + right) / 2:.0f}" y="{height - 6}" text-anchor="middle">{axis}</text>')
    for i, r in enumerate(runs):
        c = f"hsl({round(360 * i / len(runs))},70%,40%)"  # as many hues as students
        scale = last / max(r["history_epochs"]) if mixed else 1
        pts, own = points(r["history_epochs"], r["history"], scale), _own(r)
        label = f"{_label(r, runs)}: {100 * r['history'][-1]:.2f}%" + (" (- - own)" if own else "")
        end = pts[-1]  # the last point marked: a student measured once draws no line
        out.append(f'<polyline points="{" ".join(",".join(p) for p in pts)}" fill="none" stroke="{c}" stroke-width="1.5"/>'
                   f'<circle cx="{end[0]}" cy="{end[1]}" r="2.5" fill="{c}"/>'
                   f'<text x="{right + 8}" y="{top + 16 * i + 4}" fill="{c}">{_xml(label)}</text>')
        if own:  # the weights' own accuracy while they are averaged (--average), its last point ringed
            pts = points(own["epochs"], own["accuracy"], scale)
            out.append(f'<polyline points="{" ".join(",".join(p) for p in pts)}" fill="none" stroke="{c}" '
                       'stroke-width="1" stroke-dasharray="4 3"><title>the weights\' own accuracy while they are '
                       f'averaged</title></polyline><circle cx="{pts[-1][0]}" cy="{pts[-1][1]}" r="2.5" fill="none" '
                       f'stroke="{c}"/>')
    return ("\n".join(out) + "\n</svg>\n").encode()


def colour_lines(rows: list[dict]) -> list[str]:
    """What decided a user's pair's colour views (``colour.decide``), once per decision."""
    out = []
    for c in (r["colour"] for r in rows if isinstance(r.get("colour"), dict)):
        why = {"keep": "as --colour keep asks", "drop": "as --colour drop asks"}.get(c.get("by"), "nothing to probe with")
        if c.get("survival") is not None and c.get("intended", 0) >= c.get("least_intended", 0):
            why = (f"the teacher gave {c['intended']} of {c['inputs']} inputs made for a probe their class, and "
                   f"recoloured they kept it {100 * c['survival']:.1f}% of the time (the bar: {100 * c['bar']:.1f}%)")
        elif c.get("inputs"):
            why = (f"the teacher gave {c.get('intended')} of {c['inputs']} inputs made for a probe their class, too few "
                   f"to tell (fewer than {c.get('least_intended')})")
        line = f"\ncolour views ({' and '.join(map(str, c.get('of') or ()))}): {c.get('views')}: {why}."
        out += [line] if line not in out else []
    return out


def averaged_lines(rows: list[dict]) -> list[str]:
    """Each student kept as its weights' average (``--average``): which epochs, and where its own weights ended."""
    out = []
    for r in (r for r in rows if _own(r)):
        dc = (r.get("configs") or {}).get("distill") or {}
        k = epochs_averaged(dc.get("average", 0), dc.get("epochs", 0))
        out.append(f"\n{_md(_label(r, rows))}: the mean of its weights after each of epochs {dc.get('epochs', 0) - k + 1} to "
                   f"{dc.get('epochs', 0)} (--average {dc.get('average')}); the last epoch's own weights: "
                   f"{100 * r['running']['accuracy'][-1]:.2f}%.")
    return out


def deployed(rows: list[dict]) -> str:
    """The report's section on the exported students (``dfkd run --export``), or nothing."""
    done = [r for r in rows if isinstance(r.get("deploy"), dict)]
    if not done:
        return ""
    threads = sorted({r["deploy"].get("threads") for r in done} - {None})
    lines = [f"Exported students (ONNX Runtime on this machine's CPU, {'/'.join(map(str, threads)) or '?'} thread(s); "
             "latency: median per batch):\n",
             "| student | file | PyTorch % | ONNX file % | size kB | vs float32 file | ms, batch 1 | inputs/s, batch 64 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in done:
        e = r["deploy"]
        lines.append(f"| {_md(_label(r, rows))} | `{_md(e['file'])}` | {100 * r['accuracy']:.2f} | {100 * e['accuracy']:.2f}"
                     f" | {e['bytes'] / 1e3:,.1f} | " + (f"{e['fp32_bytes'] / e['bytes']:.2f}x smaller" if e["quantize"] == "int8"
                                                         else "(float32)") + f" | {e['b1_ms']:.3f} | {e['b64_per_s']:,.0f} |")
    return "\n".join(lines) + "\n\n"


def _keep_or_write(path: Path, content: bytes) -> None:
    """Write ``content`` atomically unless ``path`` holds it already (a resumed run rewrites nothing)."""
    try:
        same = path.is_file() and read_bytes(path, path.name) == content
    except DfkdError:
        same = False
    if not same:
        atomic_write(path, content)


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
    recipe = OWN[cfg.profile] if cfg.student is not None else PROFILES[cfg.profile]
    # a run's recipe as written before the modes had their own entries: a generator run's without optimise's
    recipe = {k: v for k, v in recipe.items() if k != "generator" and not (k.startswith("optimise_") and
                                                                          cfg.synthesis == "generator")}
    if cfg.synthesis == "generator":  # as the run took it: with its --iterations
        recipe["generator"] = generator_recipe(OWN[cfg.profile].get("generator", GENERATOR[cfg.profile])
                                               if cfg.student is not None else GENERATOR[cfg.profile], cfg)
    if cfg.teacher_epochs is not None:  # as the run took it: with its --teacher-epochs
        recipe["teacher_epochs"] = cfg.teacher_epochs
    doc = json.loads(json.dumps({"config": _config(cfg), "profile": recipe, "data": data,
                                 "rows": rows, "cells": cells(rows)}))
    old = _old(out / "results.json")
    if not final and old is not None and _made(old)["config"] == _made(doc)["config"] \
            and isinstance(old.get("rows"), list) and len(old["rows"]) > len(rows):
        return
    wall = old.pop("wall_seconds", None) if old is not None else None
    # the same results, however this run runs (device, progress bars, restart), and a file from before "data";
    # or the very rows (their measured seconds too: nothing made again) under a config spelt otherwise (a run
    # resumed with the settings it was made with given as flags)
    rows_kept = old is not None and ({k: v for k, v in _made(old).items() if k != "data"} ==
                                     {k: v for k, v in _made(doc).items() if k != "data"}
                                     or bool(doc["rows"]) and old.get("rows") == doc["rows"])
    wall = float(wall) if rows_kept and isinstance(wall, (int, float)) and not isinstance(wall, bool) else None
    if wall is None or _made(old) != _made(doc):
        wall = time.perf_counter() - t0 if wall is None else wall
        write_json(out / "results.json", dict(doc, wall_seconds=wall))
    seeds = f", mean of {cfg.seeds} seeds" if cfg.seeds > 1 else ""
    names = f" ({len(class_names)} classes: {', '.join(map(_md, class_names))})" if class_names else ""
    what = "MNIST, test accuracy on its 10,000 real test images" if cfg.data == "mnist" else \
        f"`{cfg.data.replace('`', chr(39))}`{names}, test accuracy on its real test split"
    _keep_or_write(out / "curve.svg", curve(rows))
    grids = [f"![{_md(_label(r, rows))}]({r['samples']})" for r in rows
             if isinstance(r.get("samples"), str) and (out / r["samples"]).is_file()]
    kept = ", last epoch" + (" (the weights' average where --average)" if any(map(_own, rows)) else "")
    md = (f"# dfkd results: {what} against the true labels{kept}{seeds}\n\n"
          + table(rows, paper_data(cfg)) + f"\nwall time so far: {wall:.0f} s\n\n"
          + f"Made by (from the folder the run was started in):\n\n```\n{command(cfg)}\n```\n\n"
          + deployed(rows) + "Test accuracy per epoch:\n\n![accuracy per epoch](curve.svg)\n"
          + ("\nSynthetic images, one row per class:\n\n" + "\n\n".join(grids) + "\n" if grids else "")).encode()
    _keep_or_write(out / "results.md", md)
