"""Command line: argument parsing and one-line error reporting only; each sub-command calls one
library function. Defaults are the config dataclasses' own; library errors name arguments in
library terms (``layers``), which this module maps to the flags (``--layers``)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import sys
from pathlib import Path

from .checkpoint import read_json
from .config import DistillConfig, ReconstructConfig, RecordConfig, TrainConfig, default
from .errors import DfkdError
from .models import user_code
from .privacy_report import clip_warnings


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error: ``dfkd: <argument>: <problem>``, exit 2."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        print(f"dfkd: {message}", file=sys.stderr)
        raise SystemExit(2)


def _finite(s: str) -> float:
    """A float flag's value: a finite number (NaN passes every later ``<``/``>`` check, and an infinite
    weight or rate only turns into NaN deep in the work)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a float") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def _positive(kind):
    def parse(s: str):
        if kind is float:
            v = _finite(s)
        else:
            try:
                v = kind(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{s!r} is not a {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{s!r} must be > 0")
        return v
    return parse


def _clip(s: str) -> tuple[str, float]:
    name, eq, bound = s.rpartition("=")
    try:
        v = float(bound)
    except ValueError:
        v = float("nan")
    if not eq or not name or not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"{s!r} is not RECORD=BOUND with a positive bound (e.g. all-layers/fc1=20)")
    return name, v


FLOAT32_MAX = 3.4028234663852886e38  # the statistics are stored in float32


def _range(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        lo = hi = float("nan")
    if not (lo < hi and hi - lo < float("inf") and max(abs(lo), abs(hi)) <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(f"{s!r} is not LOW,HIGH with LOW < HIGH, both finite in float32 "
                                         f"(|value| <= {FLOAT32_MAX:.4g}; e.g. 0,1)")
    return lo, hi


def _list(s: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in s.split(",") if p.strip()) if s else ()


def _common() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--code", action="append", default=[], metavar="FILE.py|MODULE",
                   help="user model code you allow dfkd to import for saved models made from it (repeatable)")
    return p


def _data() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument("--data", default=None, help="mnist, idx:DIR, folder:DIR or npz:FILE (default: the model's own "
                   "data, else mnist)")
    p.add_argument("--test-data", default=None, help="another source for the test split")
    return p


def _resumable() -> argparse.ArgumentParser:
    """The flag of the verbs that resume (train, reconstruct, distill, run)."""
    p = _Parser(add_help=False)
    p.add_argument("--restart", action="store_true", help="where the output holds work made with other settings, or "
                   "a damaged resume file, shard, manifest or model, discard it and start that over instead of refusing "
                   "(finished work of the same settings is kept)")
    return p


def _model_flags(p: argparse.ArgumentParser, flag: str, what: str, required: bool = True, default_=None) -> None:
    p.add_argument(f"--{flag}", required=required, default=default_,
                   help=f"{what}: a saved model (stem or file), a registry name, FILE.py:FACTORY or MODULE:FACTORY")
    p.add_argument(f"--{flag}-args", default=None, help="keyword arguments for a spec's factory, as JSON")


def _teacher_flags(p: argparse.ArgumentParser, stats: bool = True, normalize: bool = False) -> None:
    """The teacher, the weights for a teacher given as a spec, and (where read) its statistics file."""
    _model_flags(p, "teacher", "the teacher")
    p.add_argument("--weights", default=None, help="weights for a teacher given as a spec (.safetensors or a state "
                   "dict); required with a spec, or 'random' for a freshly initialised network on purpose")
    if normalize:
        p.add_argument("--normalize", default=None, help="for a teacher given as a spec: none, auto or MEAN/STD")
    if stats:
        p.add_argument("--stats", default=None, help="statistics file (default: <teacher>.stats.safetensors)")


def _model(a, flag: str = "teacher", weights: bool = True):
    """The model a flag names; ``weights``: a teacher whose statistics are made or read, which a spec
    gives only with ``--weights``."""
    from .specs import ModelRef, parse_args, require_weights
    ref = getattr(a, flag)
    m = ModelRef(ref, getattr(a, "weights", None) if weights else None,
                 parse_args(getattr(a, f"{flag}_args", None)), tuple(c for x in a.code for c in _list(x)))
    if weights:
        require_weights(m)
    return m


def _data_ref(a):
    from .specs import DataRef
    return DataRef(a.data, a.test_data, getattr(a, "normalize", None))


def _cmd_train(a) -> int:
    from .training import train_file
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=a.device,
                      progress=not a.quiet)
    path = train_file(_model(a, "model", weights=False), _data_ref(a), Path(a.out) / a.name, cfg, a.restart)
    desc = read_json(path.with_name(path.name.replace(".safetensors", ".json")))
    acc = f" (test accuracy {100 * desc['test_accuracy']:.2f}%)" if "test_accuracy" in desc else ""
    _say(f"saved {path}{acc}")
    return 0


def _cmd_record(a) -> int:
    from .recording import record_file
    cfg = RecordConfig(kinds=_list(a.kinds), layers=_list(a.layers) or None, cov=a.cov, conv_stats=a.conv_stats,
                       spectral_keep=a.spectral_keep, temperature=a.temperature, batch_size=a.batch_size,
                       device=a.device, progress=not a.quiet, privacy=a.privacy, delta=a.delta,
                       clip=tuple(a.clip), clip_quantile=a.clip_quantile, value_range=a.value_range)
    path, meta = record_file(_model(a), _data_ref(a), a.out, cfg)
    t = meta.timings
    if t:  # the process that recorded (rank 0 under torchrun)
        print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB; pass {t['pass_seconds']:.1f}s,"
              f" spectral bases {t['basis_seconds']:.1f}s)")
        _print_reveals(meta.header)
        p = meta.header.get("privacy")
        if p:
            print(f"privacy: ({p['target_epsilon']:g}, {p['delta']:.3g})-differential privacy (the accountant's "
                  f"epsilon: {p['epsilon']:.6g}); dfkd inspect lists every clip bound and noise scale")
            for w in clip_warnings(p):  # judged on released (noisy) quantities only
                print(f"dfkd: warning: {w}", file=sys.stderr)
    return 0


def _print_reveals(h: dict) -> None:
    if h.get("privacy"):  # the closed form then gives the class means plus the calibrated noise only
        return
    for r in h.get("closed_form") or []:
        if isinstance(r, dict) and r.get("class_means") == "exact":
            print(f"note: its all-layers record of {r['layer']} gives each class's mean training input exactly "
                  f"({'and its covariance ' if r.get('cov') == 'full' else ''}in closed form; see dfkd leakage). "
                  f"To ship less: --layers without {r['layer']}, or --kinds without all-layers")


def _cmd_inspect(a) -> int:
    from .metadata import load, summary
    meta = load(a.file)
    s, h = summary(meta), meta.header
    d = h["data"]
    print(f"{a.file}: {h['format']} v{h['version']}, teacher {h.get('teacher', '?')} (sha256 {h['teacher_sha256'][:12]}...)")
    print(f"kinds: {', '.join(h['kinds'])}; {h['num_classes']} classes"
          + (f" ({', '.join(d['class_names'][:10])}{'...' if len(d['class_names']) > 10 else ''})" if d.get("class_names") else "")
          + f"; recorded on {h['recorded_on']['dataset']} ({h['recorded_on']['n_samples']} samples)")
    print(f"inputs: {tuple(d['shape'])}, raw range {d['low']:g}..{d['high']:g}, normalised with mean {d['mean']} std {d['std']}")
    print("layers: " + ", ".join(f"{l['path']} {tuple(l['shape'])} per {l['stat']} cov={l['cov']}" for l in h["layers"]))
    from .privacy import describe
    print("\n".join(describe(h)))
    print(f"{'kind':<16}{'record':<36}{'floats':>12}{'bytes':>14}")
    for r in s["rows"]:
        print(f"{r['kind']:<16}{r['record']:<36}{r['floats']:>12,}{r['bytes']:>14,}")
    for k, v in s["per_kind"].items():
        ratio = f" ({100 * v['bytes'] / s['train_bytes']:.3f}% of the training inputs)" if s["train_bytes"] else ""
        print(f"total {k:<14}{v['floats']:>12,} floats {v['bytes']:>14,} bytes{ratio}")
    ratio = f"; the training inputs are {s['train_bytes']:,} bytes: {s['train_bytes'] / s['total_bytes']:.1f}x larger" \
        if s["train_bytes"] else ""
    print(f"total {s['total_floats']:,} floats, {s['total_bytes']:,} bytes{ratio}")
    _print_reveals(h)
    return 0


def _cmd_reconstruct(a) -> int:
    from .reconstruction import reconstruct_file
    from .recording import stats_path
    cfg = ReconstructConfig(objective=a.objective, n=a.n, batch_size=a.batch_size, steps=a.steps, lr=a.lr,
                            init=a.init, init_mean=a.init_mean, init_std=a.init_std, clamp=not a.no_clamp, jitter=a.jitter,
                            tv=a.tv, l2=a.l2, bn_weight=a.bn_weight, whiten=not a.no_whiten, seed=a.seed,
                            device=a.device, progress=not a.quiet, rank=a.rank, world_size=a.world_size)
    needs_stats = any(o not in ("noise", "bn-stats") for o in a.objective.split("+"))
    stats = a.stats or (str(stats_path(a.teacher)) if needs_stats else None)
    out = a.out or str(_beside(a.teacher) / "synthetic" / a.objective)
    path = reconstruct_file(_model(a), stats, out, cfg, a.allow_other_teacher, a.restart)
    if read_json(path).get("complete"):
        _say(f"wrote {a.n} inputs for {a.objective} to {path.parent} (manifest {path.name})")
    else:
        print(f"wrote this rank's shards to {path.parent}; the set is complete when every rank has finished")
    return 0


def _beside(teacher: str) -> Path:
    """Where outputs made from a teacher go by default: its folder (a published folder's parent);
    the working folder for a hub reference."""
    if teacher.startswith("hf:"):
        return Path(".")
    return Path(teacher.rstrip("/")).with_suffix("").parent


def _cmd_publish(a) -> int:
    from .publishing import publish
    path = publish(_model(a), a.stats, a.out, a.student, a.name, a.repo)
    print(f"published {path}: {', '.join(sorted(p.name for p in path.iterdir()))}")
    return 0


def _say(line: str) -> None:
    """Print once per job: on rank 0 of a torchrun job (or the only process)."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


def _cmd_distill(a) -> int:
    from .distillation import distill_file
    cfg = DistillConfig(temperature=a.temperature, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                        augment=a.augment, schedule=a.schedule, eval_every=a.eval_every, seed=a.seed,
                        adversarial=a.adversarial, device=a.device, progress=not a.quiet)
    teacher = _model(a, weights=False) if a.teacher else None
    path = distill_file(a.synthetic, _model(a, "student", weights=False), a.out, cfg, teacher, _data_ref(a),
                        a.restart)
    desc = read_json(path.with_name(path.name.replace(".safetensors", ".json")))
    acc = f" (student test accuracy {100 * desc['test_accuracy']:.2f}%)" if "test_accuracy" in desc else ""
    _say(f"saved {path}{acc}")
    return 0


def _cmd_evaluate(a) -> int:
    from .evaluation import evaluate_file
    from .specs import ModelRef
    teacher = _model(a, weights=False) if a.teacher else None
    res = evaluate_file(ModelRef(a.model, code=_model(a, weights=False).code), _data_ref(a), teacher)
    line = f"{a.model}: test accuracy {100 * res['accuracy']:.2f}% on {res['n']} inputs"
    if "agreement" in res:
        line += (f"; teacher {100 * res['teacher_accuracy']:.2f}%, share {100 * res['share_of_teacher']:.1f}%,"
                 f" agreement {100 * res['agreement']:.2f}%")
    print(line)
    if a.json:
        print(json.dumps(res, indent=2))
    return 0


def _cmd_leakage(a) -> int:
    from .leakage import leakage_file
    out = a.out or str(_beside(a.teacher) / (Path(a.teacher.rstrip("/")).with_suffix("").name + ".leakage"))
    path, rep = leakage_file(_model(a), a.stats, _data_ref(a), out, tuple(a.synthetic))
    print(f"{rep['stats']} ({', '.join(rep['kinds'])}) against the true class means of the training data:")
    if not rep["inversions"]:
        print("  no all-layers record is affine in the input: no class mean follows in closed form")
    for r in rep["inversions"]:
        how = "exactly" if r["exact"] else f"in a {r['rank']}-dimensional projection"
        print(f"  {r['layer']} (per {r['stat']}, cov {r['cov']}): class-mean inputs recovered in closed form {how} "
              f"(rank {r['rank']} of {r['input_dim']}): R^2 {r['r2']:.3f}, RMSE {r['rmse']:.4f}")
    for name, r in rep["synthetic"].items():
        near = f"; nearest training / test input {r['nearest']['ratio']:.3f}" if "nearest" in r else ""
        print(f"  synthetic {name}: class means R^2 {r['r2']:.3f}, RMSE {r['rmse']:.4f}{near}")
    png = path.with_suffix(".png")
    print(f"report: {path}" + (f", picture: {png}" if png.is_file() else ""))
    return 0


def _cmd_run(a) -> int:
    from .pipeline import RunConfig, run
    objectives = _list(a.objectives) or None
    out = a.out or f"runs/{a.profile}"
    path = run(RunConfig(out=out, profile=a.profile, networks=_list(a.networks), objectives=objectives,
                         teacher=a.teacher, teachers=a.teachers, images=a.images, steps=a.steps, epochs=a.epochs,
                         baselines=not a.no_baselines, seed=a.seed, seeds=a.seeds, data=a.data or "mnist", device=a.device,
                         conv_stats=a.conv_stats, progress=not a.quiet, restart=a.restart))
    _say((path.parent / "results.md").read_text())
    _say(f"results: {path} and {path.parent / 'results.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import RunConfig
    common, data, resumable, fmt = _common(), _data(), _resumable(), argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="dfkd", description="Data-free knowledge distillation (Lopes et al. 2017).", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common, data, resumable], formatter_class=fmt, help="train a network on real data")
    _model_flags(t, "model", "the network to train", required=False, default_="lenet5")
    t.add_argument("--normalize", default=None, help="none, auto (per-channel moments of the training data) or "
                   "MEAN/STD per channel, e.g. 0.5,0.5,0.5/0.25,0.25,0.25")
    t.add_argument("--out", default="runs/mnist", help="run directory")
    t.add_argument("--name", default="teacher", help="file stem of the saved model")
    t.add_argument("--epochs", type=_positive(int), default=default(TrainConfig, "epochs"))
    t.add_argument("--batch-size", type=_positive(int), default=default(TrainConfig, "batch_size"))
    t.add_argument("--lr", type=_positive(float), default=default(TrainConfig, "lr"))
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("record", parents=[common, data], formatter_class=fmt, help="record activation metadata")
    _teacher_flags(r, stats=False, normalize=True)
    r.add_argument("--out", default=None, help="output file (default: <teacher>.stats.safetensors)")
    r.add_argument("--kinds", default=",".join(default(RecordConfig, "kinds")), help="comma-separated")
    r.add_argument("--layers", default=None, help="comma-separated module paths (default: every Linear/Conv2d)")
    r.add_argument("--cov", default=default(RecordConfig, "cov"), help="all-layers covariance: auto, full, diag or lowrank:K")
    r.add_argument("--conv-stats", default=default(RecordConfig, "conv_stats"),
                   help="conv maps' all-layers statistics per channel (pooled over positions) or per unit")
    r.add_argument("--spectral-keep", type=_positive(float), default=default(RecordConfig, "spectral_keep"),
                   help="fraction of Fourier coefficients kept")
    r.add_argument("--temperature", type=_positive(float), default=default(RecordConfig, "temperature"))
    r.add_argument("--batch-size", type=_positive(int), default=default(RecordConfig, "batch_size"))
    r.add_argument("--privacy", type=_finite, default=None, metavar="EPSILON",
                   help="(epsilon, delta)-differential privacy for the whole file: clipped contributions, Gaussian "
                   "noise, calibrated by dp-accounting (the privacy extra)")
    r.add_argument("--delta", type=_finite, default=None, help="with --privacy (default: 1e-6, fixed whatever the "
                   "data's size; needed above 100,000 training examples)")
    r.add_argument("--clip", type=_clip, action="append", default=[], metavar="RECORD=BOUND",
                   help="with --privacy: a record's clip bound (repeatable; e.g. top-layer=5, all-layers/fc1=60); "
                   "the others are chosen privately on a share of the budget")
    r.add_argument("--clip-quantile", type=_finite, default=default(RecordConfig, "clip_quantile"),
                   help="with --privacy: the share of examples a privately chosen bound leaves unclipped")
    r.add_argument("--range", dest="value_range", type=_range, default=default(RecordConfig, "value_range"),
                   metavar="LOW,HIGH", help="the inputs' raw value range, declared public (negative: --range=-1,1); "
                   "needed with --privacy where it would be read off the data (a float npz)")
    r.set_defaults(func=_cmd_record)

    c = sub.add_parser("reconstruct", parents=[common, resumable], formatter_class=fmt,
                       help="make a synthetic set from a teacher and its statistics")
    _teacher_flags(c)
    c.add_argument("--objective", default=default(ReconstructConfig, "objective"),
                   help="top-layer, all-layers, all-layers-dropout, spectral-all, spectral-pairs, bn-stats or noise; "
                   "combine with + (e.g. all-layers+bn-stats)")
    c.add_argument("--images", dest="n", type=_positive(int), default=default(ReconstructConfig, "n"),
                   help="inputs to make (class-balanced)")
    c.add_argument("--batch-size", type=_positive(int), default=default(ReconstructConfig, "batch_size"))
    c.add_argument("--steps", type=int, default=default(ReconstructConfig, "steps"), help="Adam steps per batch")
    c.add_argument("--lr", type=_positive(float), default=default(ReconstructConfig, "lr"))
    c.add_argument("--init", default=default(ReconstructConfig, "init"),
                   help="start: noise N(--init-mean, --init-std) (the paper's); class-mean: each class's mean input, "
                   "which the file reveals in closed form, + N(0, --init-std); auto: class-mean where revealed")
    c.add_argument("--init-mean", type=_finite, default=default(ReconstructConfig, "init_mean"), help="start: raw mean")
    c.add_argument("--init-std", type=_finite, default=default(ReconstructConfig, "init_std"), help="start: raw std")
    c.add_argument("--no-clamp", action="store_true", help="do not clamp inputs to the data's range")
    c.add_argument("--jitter", type=int, default=default(ReconstructConfig, "jitter"),
                   help="roll inputs by up to this many pixels each step")
    c.add_argument("--tv", type=_finite, default=default(ReconstructConfig, "tv"), help="weight of a total-variation prior")
    c.add_argument("--l2", type=_finite, default=default(ReconstructConfig, "l2"), help="weight of an l2 prior")
    c.add_argument("--bn-weight", type=_finite, default=default(ReconstructConfig, "bn_weight"),
                   help="weight of the bn-stats term")
    c.add_argument("--no-whiten", action="store_true", help="the paper's plain squared distance (by default each "
                   "statistic's error is divided by its std; all-layers and spectral objectives)")
    c.add_argument("--out", default=None, help="output directory (default: <teacher's folder>/synthetic/<objective>)")
    c.add_argument("--allow-other-teacher", action="store_true", help="use statistics recorded on other weights")
    c.add_argument("--rank", type=int, default=None, help="this process's share of the shards, 0..W-1, with no "
                   "process group (a job array; default: torchrun's RANK, or all)")
    c.add_argument("--world-size", type=int, default=None, help="how many shares (default: torchrun's WORLD_SIZE, or 1)")
    c.set_defaults(func=_cmd_reconstruct)

    d = sub.add_parser("distill", parents=[common, data, resumable], formatter_class=fmt,
                       help="distill a student on a synthetic set")
    d.add_argument("--synthetic", required=True, help="synthetic set directory (with manifest.json)")
    _model_flags(d, "student", "the student", required=False, default_="lenet5-half")
    d.add_argument("--out", required=True, help="student file stem, e.g. runs/mnist/student")
    d.add_argument("--teacher", default=None,
                   help="saved teacher: labels augmented inputs online (else the stored logits are used)")
    d.add_argument("--augment", default=default(DistillConfig, "augment"),
                   help="affine, shift or none, optionally +mix (mixup with the reversed batch) or +cutmix "
                   "(a box pasted from it); the teacher labels every view (needs --teacher)")
    d.add_argument("--temperature", type=_positive(float), default=default(DistillConfig, "temperature"))
    d.add_argument("--epochs", type=_positive(int), default=default(DistillConfig, "epochs"))
    d.add_argument("--batch-size", type=_positive(int), default=default(DistillConfig, "batch_size"))
    d.add_argument("--lr", type=_positive(float), default=default(DistillConfig, "lr"))
    d.add_argument("--schedule", default=default(DistillConfig, "schedule"), help="constant or cosine")
    d.add_argument("--adversarial", type=_finite, default=default(DistillConfig, "adversarial"),
                   help="share of each batch pushed towards student-teacher disagreement before the teacher labels it "
                   "(needs --teacher)")
    d.add_argument("--eval-every", type=_positive(int), default=default(DistillConfig, "eval_every"),
                   help="log test accuracy every N epochs")
    d.set_defaults(func=_cmd_distill, aliases={"model": "--student", "model_args": "--student-args"})

    e = sub.add_parser("evaluate", parents=[common, data], formatter_class=fmt, help="test accuracy of a saved model")
    e.add_argument("model", help="saved model (.safetensors, .json or stem)")
    e.add_argument("--teacher", default=None, help="saved teacher, for agreement and share")
    e.add_argument("--json", action="store_true", help="also print the figures as JSON")
    e.set_defaults(func=_cmd_evaluate)

    u = sub.add_parser("run", parents=[common, data, resumable], formatter_class=fmt,
                       help="the whole pipeline on MNIST, with the paper's numbers beside ours")
    u.add_argument("--profile", default=default(RunConfig, "profile"),
                   help="quick (every objective, the whole table in minutes on CPU), best (dfkd's best student per "
                   "network), paper (the paper's losses as written, at its sizes; GPU) or tiny")
    u.add_argument("--networks", default=",".join(default(RunConfig, "networks")),
                   help="teachers: lenet5 and/or hinton-1200")
    u.add_argument("--objectives", default=None, help="comma-separated (default: the profile's, else all)")
    u.add_argument("--seeds", type=_positive(int), default=default(RunConfig, "seeds"),
                   help="students per cell (seeds --seed, --seed + 1, ...); the table gives their mean and spread")
    u.add_argument("--teacher", default=None, help="a saved teacher to use instead of training one")
    u.add_argument("--teachers", default=None,
                   help="an earlier run directory: use (or train once) <dir>/<network>/teacher and its statistics")
    u.add_argument("--images", type=_positive(int), default=None, help="synthetic images per objective "
                   "(default: the profile's)")
    u.add_argument("--steps", type=int, default=None, help="Adam steps per image (default: the profile's)")
    u.add_argument("--epochs", type=_positive(int), default=None, help="distillation epochs (default: the profile's)")
    u.add_argument("--no-baselines", action="store_true", help="skip the real-data and real-KD students")
    u.add_argument("--conv-stats", choices=("unit", "channel"), default=default(RunConfig, "conv_stats"),
                   help="conv maps' all-layers statistics per unit (the paper's) or per channel")
    u.add_argument("--out", default=None, help="run directory (default: runs/<profile>)")
    u.set_defaults(func=_cmd_run)

    k = sub.add_parser("leakage", parents=[common, data], formatter_class=fmt,
                       help="what a statistics file reveals: class means recovered from it vs the training data's")
    _teacher_flags(k, normalize=True)
    k.add_argument("--synthetic", action="append", default=[], help="a synthetic set made from the file, "
                   "scored the same way (repeatable)")
    k.add_argument("--out", default=None, help="report stem: <out>.json and <out>.png (default: <teacher>.leakage)")
    k.set_defaults(func=_cmd_leakage)

    b = sub.add_parser("publish", parents=[common], formatter_class=fmt,
                       help="one folder for a hub or a git repository: weights, config, statistics, model card")
    _teacher_flags(b)
    b.add_argument("--student", default=None, help="a student distilled from it: the card states its accuracy "
                   "and the commands that made it")
    b.add_argument("--name", default=None, help="the model's name on the card (default: the folder's)")
    b.add_argument("--repo", default=None, help="ORG/NAME on the hub, for the card's commands (hf:ORG/NAME)")
    b.add_argument("--out", required=True, help="the folder to write (must not exist)")
    b.set_defaults(func=_cmd_publish)

    i = sub.add_parser("inspect", formatter_class=fmt, help="describe a statistics file and its size")
    i.add_argument("file")
    i.set_defaults(func=_cmd_inspect)
    return p


def _flag(parser: argparse.ArgumentParser, args: argparse.Namespace, where: str) -> str:
    """A library argument name as the sub-command's flag (``layers`` -> ``--layers``)."""
    aliases = getattr(args, "aliases", {})
    if where in aliases:
        return aliases[where]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    return flags.get(where, where)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed "dfkd: <argument>: <problem>" on one line
        return int(e.code or 0)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that has gone (dfkd inspect ... | head) is met here, not at exit
        return code
    except DfkdError as e:
        print(f"dfkd: {_flag(parser, args, e.where)}: {e.problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dfkd: {args.command}: interrupted; {_AFTER_INTERRUPT.get(args.command, _STARTS_OVER)}", file=sys.stderr)
        return 130
    except OSError as e:  # a file the library did not name itself (e.g. read by a user's own code)
        if isinstance(e, BrokenPipeError) and _stdout_gone():
            return 141  # quietly, as a tool killed by SIGPIPE: the shell's 128 + 13
        print(f"dfkd: {e.filename or args.command}: {e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"dfkd: {args.command}: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 2
    except Exception as e:  # a bug in dfkd (or in the user's model code): one line, the traceback on request
        if os.environ.get("DFKD_TRACEBACK"):
            raise
        if isinstance(e, RuntimeError) and "alloc" in str(e) and "memory" in str(e):
            print(f"dfkd: {args.command}: out of memory; try a smaller --batch-size", file=sys.stderr)
            return 2
        where = _user_frame(e)
        print(f"dfkd: {where or args.command}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
              f" ({'in your code' if where else 'a dfkd bug; please report it'}; DFKD_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return 2 if where else 1


_STARTS_OVER = "run the same command again to start over"
# what running an interrupted command again does: these resume (docs/robustness.md), the others start over
_AFTER_INTERRUPT = {
    "train": "run the same command again to resume from its last finished epoch",
    "distill": "run the same command again to resume from its last finished epoch",
    "reconstruct": "run the same command again to resume from its last finished shard",
    "run": "run the same command again to resume where it stopped (finished steps are kept)",
    "record": "record is one pass and does not resume: run the same command again to start over",
}


def _stdout_gone() -> bool:
    """Whether the reader of stdout has gone (``dfkd inspect ... | head``); if so stdout is pointed at
    /dev/null, so that Python's own flush at exit stays quiet too."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if not any(ev & select.POLLERR for _, ev in poll.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    except (OSError, ValueError, AttributeError):  # no stdout of our own (captured), or no poll here
        return False
    return True


def _user_frame(e: BaseException) -> str | None:
    """``file:line`` of the innermost frame in the user's code: the model code the user named
    (``models.user_code``, wherever installed), or any file outside dfkd, the standard library and
    the installed packages (torch, numpy, ...)."""
    import traceback
    pkg = str(Path(__file__).resolve().parent)
    skip = (pkg, str(Path(json.__file__).resolve().parent.parent), str(Path(sys.prefix).resolve()),
            str(Path(sys.base_prefix).resolve()))
    mine = user_code()
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        f = str(Path(fr.filename).resolve())
        if fr.filename.startswith("<") or f.startswith(pkg + os.sep):
            continue
        if any(f == m or f.startswith(m + os.sep) for m in mine) or not f.startswith(skip):
            return f"{fr.filename}:{fr.lineno}"
    return None
