"""The command line's flags: one sub-parser per verb, the flags of its config made from the config's
fields (``cli_fields.add_fields``: name, type, default and help), the verb's own flags (its models,
data and output) written here, and argparse's errors as the project's one line
(``dfkd: <argument>: <problem>``, exit 2). What each verb does with its flags is ``cli_commands``;
``cli.main`` runs them."""
from __future__ import annotations

import argparse
import re
import sys

from .cli_fields import add_fields
from .config import DistillConfig, ExportConfig, ReconstructConfig, RecordConfig, Runtime, TrainConfig
from .run_config import RunConfig


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error: ``dfkd: <argument>: <problem>``, exit 2."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        print(f"dfkd: {message}", file=sys.stderr)
        raise SystemExit(2)


def _common() -> argparse.ArgumentParser:
    """The run-wide flags of every verb but inspect: the seed (``TrainConfig``'s), the device (``cli.main``
    picks it once) and progress bars (``Runtime``'s), spelt by their fields, and the user code dfkd may import."""
    p = _Parser(add_help=False)
    add_fields(p, TrainConfig, only=("seed",))
    add_fields(p, Runtime, only=("device", "progress"))
    p.add_argument("--code", action="append", default=[], metavar="FILE.py|MODULE",
                   help="user model code you allow dfkd to import for saved models made from it (repeatable)")
    return p


def _data() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument("--data", default=None, help="mnist, idx:DIR, folder:DIR, npz:FILE or cifar10:DIR (default: the model's own "
                   "data, else mnist)")
    p.add_argument("--test-data", default=None, help="another source for the test split")
    return p


def _resumable() -> argparse.ArgumentParser:
    """The flag of the verbs that resume (train, reconstruct, distill, run)."""
    p = _Parser(add_help=False)
    add_fields(p, RunConfig, only=("restart",))
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
    add_fields(t, TrainConfig)

    r = sub.add_parser("record", parents=[common, data], formatter_class=fmt, help="record activation metadata")
    _teacher_flags(r, stats=False, normalize=True)
    r.add_argument("--out", default=None, help="output file (default: <teacher>.stats.safetensors)")
    add_fields(r, RecordConfig)

    c = sub.add_parser("reconstruct", parents=[common, resumable], formatter_class=fmt,
                       help="make a synthetic set from a teacher and its statistics")
    _teacher_flags(c)
    c.add_argument("--out", default=None, help="output directory (default: <teacher's folder>/synthetic/<objective>)")
    c.add_argument("--allow-other-teacher", action="store_true", help="use statistics recorded on other weights")
    add_fields(c, ReconstructConfig)
    add_fields(c, Runtime, only=("rank", "world_size"))

    d = sub.add_parser("distill", parents=[common, data, resumable], formatter_class=fmt,
                       help="distill a student on a synthetic set")
    d.add_argument("--synthetic", required=True, help="synthetic set directory (with manifest.json)")
    _model_flags(d, "student", "the student", required=False, default_="lenet5-half")
    d.add_argument("--out", required=True, help="student file stem, e.g. runs/mnist/student")
    d.add_argument("--teacher", default=None,
                   help="saved teacher: labels augmented inputs online (else the stored logits are used)")
    add_fields(d, DistillConfig)
    d.set_defaults(aliases={"model": "--student", "model_args": "--student-args"})

    e = sub.add_parser("evaluate", parents=[common, data], formatter_class=fmt, help="test accuracy of a saved model")
    e.add_argument("model", help="saved model (.safetensors, .json or stem)")
    e.add_argument("--teacher", default=None, help="saved teacher, for agreement and share")
    e.add_argument("--json", action="store_true", help="also print the figures as JSON")

    u = sub.add_parser("run", parents=[common, resumable], formatter_class=fmt,
                       help="the whole pipeline: the paper's networks with its numbers beside ours, or your own "
                       "teacher and student")
    add_fields(u, RunConfig)

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

    x = sub.add_parser("export", parents=[common, data], formatter_class=fmt,
                       help="an ONNX file of a saved model (raw inputs in), int8 on a synthetic set where asked")
    x.add_argument("model", help="a saved model (stem or file), a published folder or hf:ORG/NAME; or a spec with --weights")
    x.add_argument("--weights", default=None, help="weights for a model given as a spec")
    x.add_argument("--model-args", default=None, help="keyword arguments for a spec's factory, as JSON")
    x.add_argument("--normalize", default=None, help="for a model given as a spec: the normalisation it was trained "
                   "with (none, auto or MEAN/STD; with --data, its input shape's source)")
    x.add_argument("--out", required=True, help="the ONNX file to write (FILE.onnx)")
    x.add_argument("--calibration", default=None, help="a dfkd synthetic set (dfkd reconstruct's folder): the "
                   "calibration inputs of --quantize int8")
    x.add_argument("--calibration-npz", default=None, help="also write the calibration inputs (raw, as the file takes "
                   "them) and their teacher labels to this .npz, for another runtime's quantizer")
    add_fields(x, ExportConfig)

    i = sub.add_parser("inspect", formatter_class=fmt, help="describe a statistics file and its size")
    i.add_argument("file")
    return p
