"""Command line: argument parsing and one-line error reporting only; each sub-command
calls one library function."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .config import DistillConfig
from .errors import DfkdError


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error: ``dfkd: <argument>: <problem>``, exit 2."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        print(f"dfkd: {message}", file=sys.stderr)
        raise SystemExit(2)


def _common() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--data-dir", default=None, help="directory of MNIST IDX files (default: the packaged MNIST)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{s!r} must be > 0")
        return v
    return parse


def _cmd_train(a: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .train import train

    path = train(TrainConfig(model=a.model, out=a.out, name=a.name, epochs=a.epochs, batch_size=a.batch_size,
                             lr=a.lr, seed=a.seed, data_dir=a.data_dir, device=a.device, progress=not a.quiet))
    desc = json.loads(path.with_suffix(".json").read_text())
    print(f"saved {path} (test accuracy {100 * desc['test_accuracy']:.2f}%)")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate

    res = evaluate(a.model, a.teacher, a.data_dir)
    line = f"{a.model}: test accuracy {100 * res['accuracy']:.2f}% on {res['n']} images"
    if "agreement" in res:
        line += (f"; teacher {100 * res['teacher_accuracy']:.2f}%, share {100 * res['share_of_teacher']:.1f}%,"
                 f" agreement {100 * res['agreement']:.2f}%")
    print(line)
    if a.json:
        print(json.dumps(res, indent=2))
    return 0


def _cmd_record(a: argparse.Namespace) -> int:
    from .config import RecordConfig
    from .record import record_file

    kinds = tuple(k.strip().replace("-", "_") for k in a.kinds.split(",") if k.strip())
    layers = tuple(p.strip() for p in a.layers.split(",")) if a.layers else None
    path, meta = record_file(RecordConfig(teacher=a.teacher, out=a.out, kinds=kinds, layers=layers, cov=a.cov,
                                          spectral_keep=a.spectral_keep, batch_size=a.batch_size,
                                          data_dir=a.data_dir, device=a.device, progress=not a.quiet))
    t = meta.timings
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB; pass {t['pass_seconds']:.1f}s,"
          f" spectral bases {t['basis_seconds']:.1f}s)")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .metadata import load, summary

    meta = load(a.file)
    s = summary(meta)
    h = meta.header
    print(f"{a.file}: {h['format']} v{h['version']}, teacher {h['teacher_arch']} (sha256 {h['teacher_sha256'][:12]}...)")
    print(f"kinds: {', '.join(h['kinds'])}; {h['num_classes']} classes; recorded on {h['recorded_on']['dataset']}"
          f" ({h['recorded_on']['n_samples']} samples)")
    print("layers: " + ", ".join(f"{l['path']} {tuple(l['shape'])} cov={l['cov']}" for l in h["layers"]))
    print(f"{'kind':<16}{'record':<36}{'floats':>12}{'bytes':>14}")
    for r in s["rows"]:
        print(f"{r['kind']:<16}{r['record']:<36}{r['floats']:>12,}{r['bytes']:>14,}")
    for k, v in s["per_kind"].items():
        ratio = f" ({100 * v['bytes'] / s['train_bytes']:.3f}% of the training images)" if s["train_bytes"] else ""
        print(f"total {k:<14}{v['floats']:>12,} floats {v['bytes']:>14,} bytes{ratio}")
    ratio = f"; the training images are {s['train_bytes']:,} bytes: {s['train_bytes'] / s['total_bytes']:.1f}x larger" \
        if s["train_bytes"] else ""
    print(f"total {s['total_floats']:,} floats, {s['total_bytes']:,} bytes{ratio}")
    return 0


def _cmd_reconstruct(a: argparse.Namespace) -> int:
    from .config import ReconstructConfig
    from .reconstruct import reconstruct_file

    objective = a.objective.replace("_", "-")
    cfg = ReconstructConfig(objective=objective, n=a.n, batch_size=a.batch_size, steps=a.steps, lr=a.lr,
                            clamp=not a.no_clamp, jitter=a.jitter, tv=a.tv, whiten=not a.no_whiten,
                            seed=a.seed, device=a.device,
                            progress=not a.quiet)
    stats = a.stats
    if stats is None and objective != "noise":
        from .record import stats_path
        stats = str(stats_path(a.teacher))
    out = a.out or str(Path(a.teacher).with_suffix("").parent / "synthetic" / objective)
    path = reconstruct_file(a.teacher, stats, out, cfg, a.allow_other_teacher)
    print(f"wrote {a.n} images for {objective} to {path.parent} (manifest {path.name}, grid samples.png)")
    return 0


def _cmd_distill(a: argparse.Namespace) -> int:
    from .distill import distill

    cfg = DistillConfig(student=a.student, temperature=a.temperature, epochs=a.epochs, batch_size=a.batch_size,
                        lr=a.lr, augment=a.augment, eval_every=a.eval_every, seed=a.seed, device=a.device,
                        progress=not a.quiet)
    path = distill(a.synthetic, a.out, cfg, a.data_dir, a.teacher)
    desc = json.loads(path.with_suffix(".json").read_text())
    print(f"saved {path} (student test accuracy {100 * desc['test_accuracy']:.2f}%)")
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from .pipeline import RunConfig, run

    objectives = tuple(o.strip() for o in a.objectives.split(",")) if a.objectives else RunConfig.objectives
    networks = tuple(n.strip() for n in a.networks.split(",") if n.strip())
    out = a.out or f"runs/{a.profile}"
    path = run(RunConfig(out=out, profile=a.profile, networks=networks, objectives=objectives, teacher=a.teacher,
                         teachers=a.teachers, images=a.images, steps=a.steps, baselines=not a.no_baselines,
                         seed=a.seed, data_dir=a.data_dir, device=a.device, progress=not a.quiet))
    print((path.parent / "results.md").read_text())
    print(f"results: {path} and {path.parent / 'results.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(prog="dfkd", description="Data-free knowledge distillation (Lopes et al. 2017).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train", parents=[common], formatter_class=fmt, help="train a network on real MNIST")
    t.add_argument("--model", default="lenet5", help="registry name")
    t.add_argument("--out", default="runs/mnist", help="run directory")
    t.add_argument("--name", default="teacher", help="file stem of the saved model")
    t.add_argument("--epochs", type=_positive(int), default=10)
    t.add_argument("--batch-size", type=_positive(int), default=64)
    t.add_argument("--lr", type=_positive(float), default=1e-3)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", parents=[common], formatter_class=fmt, help="test accuracy of a saved model")
    e.add_argument("model", help="saved model (.safetensors, .json or stem)")
    e.add_argument("--teacher", default=None, help="saved teacher, for agreement and share")
    e.add_argument("--json", action="store_true", help="also print the figures as JSON")
    e.set_defaults(func=_cmd_evaluate)
    r = sub.add_parser("record", parents=[common], formatter_class=fmt, help="record activation metadata")
    r.add_argument("--teacher", required=True, help="saved teacher (stem or file)")
    r.add_argument("--out", default=None, help="output file (default: <teacher>.stats.safetensors)")
    r.add_argument("--kinds", default="top_layer,all_layers,spectral_all,spectral_pairs", help="comma-separated")
    r.add_argument("--layers", default=None, help="comma-separated module paths (default: every Linear/Conv2d)")
    r.add_argument("--cov", default="auto", help="all-layers covariance: auto, full, diag or lowrank:K")
    r.add_argument("--spectral-keep", type=_positive(float), default=0.10, help="fraction of Fourier coefficients kept")
    r.add_argument("--batch-size", type=_positive(int), default=1000)
    r.set_defaults(func=_cmd_record)

    c = sub.add_parser("reconstruct", parents=[common], formatter_class=fmt,
                       help="make a synthetic set from a teacher and its statistics")
    c.add_argument("--teacher", required=True, help="saved teacher (stem or file)")
    c.add_argument("--stats", default=None, help="statistics file (default: <teacher>.stats.safetensors)")
    c.add_argument("--objective", default="spectral-pairs",
                   help="top-layer, all-layers, all-layers-dropout, spectral-all, spectral-pairs or noise")
    c.add_argument("--n", type=_positive(int), default=2000, help="images to make (class-balanced)")
    c.add_argument("--batch-size", type=_positive(int), default=500)
    c.add_argument("--steps", type=int, default=1000, help="Adam steps per batch")
    c.add_argument("--lr", type=_positive(float), default=0.07)
    c.add_argument("--no-clamp", action="store_true", help="do not clamp inputs to [0, 1]")
    c.add_argument("--jitter", type=int, default=0, help="roll inputs by up to this many pixels each step")
    c.add_argument("--tv", type=float, default=0.0, help="weight of a total-variation prior on the inputs")
    c.add_argument("--no-whiten", action="store_true", help="the paper's plain squared distance (by default each "
                   "statistic's error is divided by its std; all-layers and spectral objectives)")
    c.add_argument("--out", default=None, help="output directory (default: <run>/synthetic/<objective>)")
    c.add_argument("--allow-other-teacher", action="store_true", help="use statistics recorded on other weights")
    c.set_defaults(func=_cmd_reconstruct)

    d = sub.add_parser("distill", parents=[common], formatter_class=fmt, help="distill a student on a synthetic set")
    d.add_argument("--synthetic", required=True, help="synthetic set directory (with manifest.json)")
    d.add_argument("--student", default="lenet5-half", help="registry name")
    d.add_argument("--out", required=True, help="student file stem, e.g. runs/mnist/student")
    d.add_argument("--teacher", default=None,
                   help="saved teacher: labels augmented inputs online (else the stored logits are used)")
    d.add_argument("--augment", default=DistillConfig.augment,
                   help="affine, shift, shift+mix or none (needs --teacher)")
    d.add_argument("--temperature", type=_positive(float), default=8.0)
    d.add_argument("--epochs", type=_positive(int), default=30)
    d.add_argument("--batch-size", type=_positive(int), default=64)
    d.add_argument("--lr", type=_positive(float), default=1e-3)
    d.add_argument("--eval-every", type=_positive(int), default=1, help="log test accuracy every N epochs")
    d.set_defaults(func=_cmd_distill)

    u = sub.add_parser("run", parents=[common], formatter_class=fmt,
                       help="the whole pipeline on MNIST, with the paper's numbers beside ours")
    u.add_argument("--profile", default="quick", help="quick (CPU, minutes), paper (the paper's sizes; GPU) or tiny")
    u.add_argument("--networks", default="lenet5,hinton-1200", help="teachers: lenet5 and/or hinton-1200")
    u.add_argument("--objectives", default=None, help="comma-separated (default: all)")
    u.add_argument("--teacher", default=None, help="a saved teacher to use instead of training one")
    u.add_argument("--teachers", default=None,
                   help="an earlier run directory: use (or train once) <dir>/<network>/teacher and its statistics")
    u.add_argument("--images", type=_positive(int), default=None, help="synthetic images per objective "
                   "(default: the profile's)")
    u.add_argument("--steps", type=int, default=None, help="Adam steps per image (default: the profile's)")
    u.add_argument("--no-baselines", action="store_true", help="skip the real-data and real-KD students")
    u.add_argument("--out", default=None, help="run directory (default: runs/<profile>)")
    u.set_defaults(func=_cmd_run)

    i = sub.add_parser("inspect", formatter_class=fmt, help="describe a statistics file and its size")
    i.add_argument("file")
    i.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed "dfkd <cmd>: error: ..." on one line
        return int(e.code or 0)
    try:
        return args.func(args)
    except DfkdError as e:
        print(f"dfkd: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfkd: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
