"""What the published statistics reveal, per kind and record form, beside what each kind buys.

``python -m benchmarks leakage [--run runs/quick] [--own runs/own] [--out docs/leakage]`` takes a
finished ``dfkd run`` (its teachers, statistics, synthetic sets and results) and, if given, the
own-model benchmark's folder (``python -m benchmarks own``), and for each teacher measures
(``dfkd.leakage``): the class-mean inputs that follow in closed form from its all-layers
record, per unit (the paper's form) and per channel (dfkd's default for conv layers); and, per
kind, the class means of the synthetic set an attacker makes from the file with dfkd itself,
and how close those inputs lie to training inputs compared with unseen test inputs. Beside
each kind: the student accuracy it gave in that run. Writes ``<out>.json`` and one picture
per teacher, ``<out>-<teacher>.png`` (one row per class; columns: the true class mean, the
closed-form recoveries (per unit, then per channel), then the synthetic sets' class means in
alphabetical order)."""
from __future__ import annotations

import argparse
from pathlib import Path

from dfkd.config import RecordConfig, Runtime
from dfkd.files import read_json, write_json
from dfkd.leakage import measure, picture
from dfkd.metadata import load
from dfkd.recording import record
from dfkd.specs import DataRef, ModelRef, open_with_data
from dfkd.synthetic import SyntheticSet

QUIET = Runtime(progress=False)  # no bars, no epoch lines in a measurement


def teacher_report(folder: Path, code: tuple[str, ...], accuracy: dict[str, float]) -> tuple[dict, dict]:
    model, desc, source = open_with_data(ModelRef(str(folder / "teacher"), code=code), DataRef())
    meta = load(folder / "teacher.stats.safetensors", desc["sha256"])
    sets = {}
    for d in sorted((folder / "synthetic").iterdir()) if (folder / "synthetic").is_dir() else []:
        if (d / "manifest.json").is_file():
            s = SyntheticSet(d).open()
            x, y, _ = s.load()
            sets[d.name] = (x, y)  # raw, as the data
    report, images = measure(model, meta, source.train, sets, source.test)
    for name, row in report["synthetic"].items():
        row["student_accuracy"] = accuracy.get(name)
    conv = [l["stat"] for l in meta.header["layers"] if l["type"] == "conv"]
    if conv:  # the other form of the conv records too (per channel is dfkd's default, per unit the paper's)
        other = "channel" if conv[0] == "unit" else "unit"
        alt = record(model, source, RecordConfig(kinds=("all-layers",), conv_stats=other), rt=QUIET)
        rep_alt, img_alt = measure(model, alt, source.train)
        for inv in rep_alt["inversions"]:
            report["inversions"].append(inv)
            images[f"inverted {inv['layer']} per {other}"] = img_alt[f"inverted {inv['layer']} per {other}"]
    report["size_bytes"] = (folder / "teacher.stats.safetensors").stat().st_size
    order = ["truth"] + sorted(k for k in images if k.startswith("inverted"))[::-1] + \
        [k for k in images if k != "truth" and not k.startswith("inverted")]
    return report, {k: images[k] for k in order}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks leakage", description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default="runs/quick", help="a finished dfkd run folder (default: %(default)s)")
    p.add_argument("--own", default=None, help="the own-model benchmark's folder (python -m benchmarks own)")
    p.add_argument("--out", default="docs/leakage", help="report stem (default: %(default)s)")
    a = p.parse_args(argv)
    run = Path(a.run)
    results = read_json(run / "results.json")
    teachers = [(run / net, net, ()) for net in dict.fromkeys(r["teacher"] for r in results["rows"])]
    if a.own:
        teachers.append((Path(a.own), "own-model", ("examples/own_model.py",)))
    out, full = Path(a.out), {}
    print(f"{'teacher':<14}{'source':<34}{'class means R^2':>16}{'RMSE':>8}{'near train/test':>17}{'student %':>11}")
    for folder, name, code in teachers:
        acc = {r["objective"]: r["accuracy"] for r in results["rows"] if r["teacher"] == name}
        if name == "own-model":
            own = read_json(folder / "own.json") if (folder / "own.json").is_file() else {"rows": []}
            acc = {r["objective"]: r["accuracy"] for r in own.get("rows", [])}
        report, images = teacher_report(folder, code, acc)
        full[name] = report
        for inv in report["inversions"]:
            src = f"closed form, {inv['layer']} per {inv['stat']}" + ("" if inv["exact"] else f" (rank {inv['rank']})")
            print(f"{name:<14}{src:<34}{inv['r2']:>16.3f}{inv['rmse']:>8.4f}{'':>17}{'':>11}")
        for kind, row in report["synthetic"].items():
            near = f"{row['nearest']['ratio']:.3f}" if "nearest" in row else ""
            s_acc = f"{100 * row['student_accuracy']:.2f}" if row.get("student_accuracy") is not None else ""
            print(f"{name:<14}{'dfkd reconstruct ' + kind:<34}{row['r2']:>16.3f}{row['rmse']:>8.4f}{near:>17}{s_acc:>11}")
        picture(out.with_name(f"{out.name}-{name}.png"), images, load(folder / "teacher.stats.safetensors").data)
    write_json(out.with_name(out.name + ".json"), full)
    return full
