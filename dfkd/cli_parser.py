"""The command line's flags: one sub-parser per verb, its defaults the config dataclasses' own
(``config.default``), and argparse's errors as the project's one line (``dfkd: <argument>: <problem>``,
exit 2). What each verb does with its flags is ``cli_commands``; ``cli.main`` runs them."""
from __future__ import annotations

import argparse
import math
import re
import sys

from .config import DistillConfig, ReconstructConfig, RecordConfig, RunConfig, TrainConfig, default
from .data import FLOAT32_MAX


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


def _range(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        lo = hi = float("nan")
    if not (lo < hi and hi - lo < float("inf") and max(abs(lo), abs(hi)) <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(f"{s!r} is not LOW,HIGH with LOW < HIGH, both finite in float32 "
                                         f"(|value| <= {FLOAT32_MAX:.4g}; e.g. 0,1)")
    return lo, hi


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


def build_parser() -> argparse.ArgumentParser:
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
    d.set_defaults(aliases={"model": "--student", "model_args": "--student-args"})

    e = sub.add_parser("evaluate", parents=[common, data], formatter_class=fmt, help="test accuracy of a saved model")
    e.add_argument("model", help="saved model (.safetensors, .json or stem)")
    e.add_argument("--teacher", default=None, help="saved teacher, for agreement and share")
    e.add_argument("--json", action="store_true", help="also print the figures as JSON")

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

    k = sub.add_parser("leakage", parents=[common, data], formatter_class=fmt,
                       help="what a statistics file reveals: class means recovered from it vs the training data's")
    _teacher_flags(k, normalize=True)
    k.add_argument("--synthetic", action="append", default=[], help="a synthetic set made from the file, "
                   "scored the same way (repeatable)")
    k.add_argument("--out", default=None, help="report stem: <out>.json and <out>.png (default: <teacher>.leakage)")

    b = sub.add_parser("publish", parents=[common], formatter_class=fmt,
                       help="one folder for a hub or a git repository: weights, config, statistics, model card")
    _teacher_flags(b)
    b.add_argument("--student", default=None, help="a student distilled from it: the card states its accuracy "
                   "and the commands that made it")
    b.add_argument("--name", default=None, help="the model's name on the card (default: the folder's)")
    b.add_argument("--repo", default=None, help="ORG/NAME on the hub, for the card's commands (hf:ORG/NAME)")
    b.add_argument("--out", required=True, help="the folder to write (must not exist)")

    i = sub.add_parser("inspect", formatter_class=fmt, help="describe a statistics file and its size")
    i.add_argument("file")
    return p
