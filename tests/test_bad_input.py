"""The bad-input matrix: every file dfkd reads, every argument and the environment, each answered
with one line ``dfkd: <file or argument>: <problem>``, exit code 2, no traceback, nothing
half-written. ``docs/robustness.md`` lists the same cases (``python -m tests.test_bad_input``
prints the table from a real run), and a test keeps the two in step.

Most cases call ``dfkd.cli.main`` in this process (fast); those that need a process of their
own (a file-size limit, a lock held by another process, the real entry point) run ``python -m dfkd``.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from dfkd.cli import main
from dfkd.config import RecordConfig
from dfkd.recording import record_file
from dfkd.specs import DataRef, ModelRef
from tests.conftest import OWN, ROOT, make_world, write_idx

# --- helpers that write hostile files -------------------------------------------------------------
def copy_model(w, tmp, name, desc_edit=None, weights=None) -> Path:
    desc = json.loads((w.dir / "teacher.json").read_text())
    if desc_edit:
        desc_edit(desc)
    (tmp / f"{name}.json").write_text(desc if isinstance(desc, str) else json.dumps(desc))
    (tmp / f"{name}.safetensors").write_bytes(weights if weights is not None else (w.dir / "teacher.safetensors").read_bytes())
    return tmp / name


def stats_with_header(w, tmp, header_edit=None, tensors_edit=None, raw_header=None) -> Path:
    from dfkd.metadata import load
    meta = load(w.stats)
    h, t = dict(meta.header), dict(meta.tensors)
    if tensors_edit:
        tensors_edit(t)
    if header_edit:
        header_edit(h)
    p = tmp / "x.stats.safetensors"
    p.write_bytes(st_save(t, metadata={"dfkd": raw_header if raw_header is not None else json.dumps(h)}))
    return p


def _norms_elsewhere(w, tmp) -> Path:
    """The world's statistics with a well-formed norm-stats record (checksummed) of a LayerNorm at ``conv1``,
    a path where the LeNet teacher has a Conv2d."""
    from dfkd.metadata import Metadata, load, save
    meta = load(w.stats)
    header = dict(meta.header, kinds=[*meta.kinds, "norm-stats"],
                  norms=[{"path": "conv1", "type": "LayerNorm", "features": 6}])
    c = meta.num_classes
    tensors = dict(meta.tensors, **{f"norm-stats/conv1/{s}": torch.ones(c, 6) for s in ("mean", "std")})
    return save(Metadata(header, tensors), tmp / "n.stats.safetensors")


def synthetic_copy(w, tmp, manifest_edit=None, shard_bytes=None) -> Path:
    d = tmp / "syn"
    d.mkdir()
    for f in w.synthetic.iterdir():
        if f.suffix in (".json", ".safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
    if manifest_edit:
        m = json.loads((d / "manifest.json").read_text())
        m = manifest_edit(m) or m
        (d / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))
    if shard_bytes:
        (d / "shard-00000.safetensors").write_bytes(shard_bytes((d / "shard-00000.safetensors").read_bytes()))
    return d


def npz(tmp, compressed=False, **arrays) -> str:
    p = tmp / "d.npz"
    (np.savez_compressed if compressed else np.savez)(p, **arrays)
    return f"npz:{p}"


def png_bomb(path: Path, w: int = 100_000, h: int = 100_000) -> None:
    """A tiny PNG whose header declares 10^10 pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def folder(tmp, per_class=3, classes=("a", "b"), size=(8, 8)) -> Path:
    from PIL import Image
    root = tmp / "imgs"
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full(size, 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def idx_copy(w, tmp, edit) -> str:
    d = tmp / "idx"
    d.mkdir()
    for f in w.idx.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    edit(d)
    return f"idx:{d}"


def deep(n=100_000) -> str:
    return "[" * n + "]" * n


def pickle_payload(tmp) -> Path:
    """A .pt whose unpickling would create a file: refused by weights_only, so the file never appears."""
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp / "PWNED"), "w"))
    p = tmp / "evil.pt"
    torch.save({"fc.weight": Payload()}, p)
    return p


T = ["--quiet"]
# id, what is read, how it is bad, argv builder (w, tmp) -> argv, words the one line must hold
CASES = [
    # arguments
    ("arg-model-name", "argument", "unknown registry name",
     lambda w, t: ["train", "--model", "resnet"], ["--model", "hinton-1200"]),
    ("arg-nonpositive", "argument", "--epochs 0", lambda w, t: ["train", "--epochs", "0"], ["--epochs", "> 0"]),
    ("arg-args-json", "argument", "--model-args not JSON",
     lambda w, t: ["train", "--model-args", "{bad"], ["--model-args", "not valid JSON"]),
    ("arg-args-type", "argument", "--model-args a list", lambda w, t: ["train", "--model-args", "[1]"],
     ["--model-args", "JSON object"]),
    ("arg-args-deep", "argument", "--model-args nested 100,000 deep",
     lambda w, t: ["train", "--model-args", deep()], ["--model-args", "nested deeper"]),
    ("arg-args-unknown", "argument", "--model-args with an unknown keyword",
     lambda w, t: ["train", "--model-args", '{"depth": 3}', "--data", w.data, "--out", t / "o"], ["--model-args", "depth"]),
    ("arg-data-kind", "argument", "unknown data source", lambda w, t: ["train", "--data", "imagenet:x"],
     ["--data", "unknown data source"]),
    ("arg-normalize", "argument", "--normalize with std 0",
     lambda w, t: ["train", "--data", w.data, "--normalize", "0.5/0", "--out", t / "o"], ["--normalize", "std"]),
    ("arg-device", "argument", "--device cuda on a machine without CUDA",
     lambda w, t: ["train", "--device", "cuda", "--data", w.data, "--out", t / "o"] + T, ["--device", "no CUDA device"]),
    ("arg-device-bogus", "argument", "--device naming no device torch knows",
     lambda w, t: ["train", "--device", "tpu9", "--data", w.data, "--out", t / "o"] + T, ["--device", "unknown device 'tpu9'"]),
    ("arg-kinds", "argument", "--kinds misspelt", lambda w, t: ["record", "--teacher", w.teacher, "--kinds", "top_layer",
                                                                 "--out", t / "s"], ["--kinds", "top-layer"]),
    ("arg-layers", "argument", "--layers naming no layer",
     lambda w, t: ["record", "--teacher", w.teacher, "--layers", "fc9", "--out", t / "s"], ["--layers", "nearest"]),
    ("arg-layers-out-proj", "argument", "--layers naming an nn.MultiheadAttention's out_proj (a ViT's)",
     lambda w, t: ["record", "--teacher", f"{ROOT / 'examples' / 'vit.py'}:teacher", "--teacher-args",
                   '{"in_channels": 1, "image": 28}', "--weights", "random", "--data", w.data,
                   "--layers", "blocks.0.att.out_proj", "--out", t / "s"],
     ["--layers", "never ran", "nn.MultiheadAttention", "record blocks.0.att instead"]),
    ("arg-layers-maps", "argument", "--layers asking for the attention maps (PATH:maps) of a module that is not an "
                                    "nn.MultiheadAttention",
     lambda w, t: ["record", "--teacher", f"{ROOT / 'examples' / 'vit.py'}:teacher", "--teacher-args",
                   '{"in_channels": 1, "image": 28}', "--weights", "random", "--data", w.data,
                   "--layers", "blocks.0.norm1:maps", "--out", t / "s"],
     ["--layers", "blocks.0.norm1:maps", "names an nn.MultiheadAttention's attention weights", "LayerNorm"]),
    ("arg-kinds-norm-stats", "argument", "--kinds norm-stats for a teacher without LayerNorm or GroupNorm",
     lambda w, t: ["record", "--teacher", w.teacher, "--kinds", "norm-stats", "--out", t / "s"],
     ["--kinds", "norm-stats needs LayerNorm or GroupNorm layers"]),
    ("arg-kinds-token-positions", "argument", "--kinds token-positions for a teacher without a token layer",
     lambda w, t: ["record", "--teacher", w.teacher, "--kinds", "token-positions", "--out", t / "s"],
     ["--kinds", "token-positions needs a token layer recorded per feature"]),
    ("arg-normalize-saved", "argument", "--normalize for a saved teacher (it brings its own)",
     lambda w, t: ["record", "--teacher", w.teacher, "--normalize", "auto", "--out", t / "s"],
     ["--normalize", "brings the normalisation it was trained with"]),
    ("arg-privacy", "argument", "--privacy 0", lambda w, t: ["record", "--teacher", w.teacher, "--privacy", "0",
                                                             "--out", t / "s"], ["--privacy", "positive"]),
    ("arg-delta", "argument", "--delta 1 with --privacy", lambda w, t: ["record", "--teacher", w.teacher, "--privacy",
                                                                        "1", "--delta", "1", "--out", t / "s"],
     ["--delta", "(0, 1)"]),
    ("arg-delta-alone", "argument", "--delta without --privacy",
     lambda w, t: ["record", "--teacher", w.teacher, "--delta", "1e-6", "--out", t / "s"], ["--privacy", "need"]),
    ("arg-clip-syntax", "argument", "--clip without RECORD=BOUND",
     lambda w, t: ["record", "--teacher", w.teacher, "--privacy", "1", "--clip", "5", "--out", t / "s"],
     ["--clip", "RECORD=BOUND"]),
    ("arg-clip-record", "argument", "--clip naming no record of the file",
     lambda w, t: ["record", "--teacher", w.teacher, "--privacy", "1", "--kinds", "top-layer", "--clip", "fc9=5",
                   "--out", t / "s"], ["--clip", "no record 'fc9'"]),
    ("arg-cov", "argument", "--cov lowrank:x", lambda w, t: ["record", "--teacher", w.teacher, "--cov", "lowrank:x",
                                                              "--out", t / "s"], ["--cov"]),
    ("arg-objective", "argument", "unknown objective",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "magic", "--out", t / "r"], ["--objective"]),
    ("arg-bn-free", "argument", "bn-stats on a teacher without BatchNorm",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "bn-stats", "--out", t / "r"],
     ["--objective", "BatchNorm"]),
    ("arg-augment", "argument", "unknown --augment",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--teacher", w.teacher, "--augment", "warp",
                   "--out", t / "s"] + T, ["--augment"]),
    ("arg-augment-no-teacher", "argument", "dfkd distill --augment views without a teacher to label them",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--augment", "affine+backdrop", "--out", t / "s"] + T,
     ["--teacher", "the views affine+backdrop are labelled by the teacher"]),
    ("arg-adversarial-no-teacher", "argument", "dfkd distill --adversarial without a teacher to label the pushed inputs",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--adversarial", "0.5", "--out", t / "s"] + T,
     ["--teacher", "pushed towards disagreement (--adversarial) are labelled by the teacher"]),
    ("arg-augment-vectors", "argument", "dfkd distill --augment with image views, typed, on a set of vectors",
     lambda w, t: ["distill", "--synthetic", _vector_set(t), "--teacher", t / "v" / "teacher", "--augment",
                   "affine+cutmix", "--out", t / "s"] + T,
     ["--augment", "affine+cutmix needs images [C, H, W]; these inputs are (20,) (vectors take none or none+mix)"]),
    ("arg-average", "argument", "--average outside [0, 1)",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--teacher", w.teacher, "--average", "1", "--out", t / "s"] + T,
     ["--average", "the share of the epochs to average must be in [0, 1)"]),
    ("arg-average-epochs", "argument", "--average that averages fewer than two epochs",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--teacher", w.teacher, "--epochs", "3", "--average", "0.1",
                   "--out", t / "s"] + T, ["--average", "0.1 of 3 epochs averages 0"]),
    ("arg-average-generator", "argument", "dfkd run --average with --synthesis generator (no set, no epochs)",
     lambda w, t: ["run", "--synthesis", "generator", "--average", "0.5", "--out", t / "run"],
     ["--average", "averages epochs on a synthetic set, which --synthesis generator does not make"]),
    ("arg-train-augment", "argument", "dfkd train --augment that mixes inputs (a view keeps its image's label)",
     lambda w, t: ["train", "--augment", "affine+mix", "--out", t / "t"], ["--augment", "each input keeps its own label"]),
    ("arg-train-augment-vectors", "argument", "dfkd train --augment on inputs that are not images",
     lambda w, t: ["train", "--model", "hinton-1200", "--augment", "shift", "--data", _vectors(t), "--out", t / "o"],
     ["--augment", "views need images"]),
    ("arg-seen-views", "argument", "--seen-views that mixes inputs",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "all-layers", "--seen-views", "affine+mix",
                   "--out", t / "r"], ["--seen-views", "each input keeps its own label"]),
    ("arg-patch-tv", "argument", "--patch-tv without the patches' side",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "all-layers", "--patch-tv", "0.1",
                   "--out", t / "r"], ["--patch", "needs the patches' side"]),
    ("arg-init", "argument", "unknown --init",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "all-layers", "--init", "mean",
                   "--out", t / "r"], ["--init"]),
    ("arg-init-unrevealed", "argument", "--init class-mean where the file reveals no class mean (per-channel conv)",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "all-layers", "--init", "class-mean",
                   "--out", t / "r"], ["--init", "reveal no class mean"]),
    ("arg-seeds", "argument", "dfkd run --seeds 0",
     lambda w, t: ["run", "--seeds", "0", "--out", t / "run"], ["--seeds", "> 0"]),
    ("arg-schedule", "argument", "unknown --schedule",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--schedule", "linear", "--out", t / "s"] + T, ["--schedule"]),
    ("arg-networks", "argument", "dfkd run with an unknown network",
     lambda w, t: ["run", "--networks", "resnet", "--out", t / "run"], ["--networks"]),
    ("arg-profile", "argument", "dfkd run with an unknown profile",
     lambda w, t: ["run", "--profile", "huge", "--out", t / "run"], ["--profile"]),
    ("run-own-no-teacher", "argument", "dfkd run with your own student and no teacher",
     lambda w, t: ["run", "--student", f"{OWN}:student", "--out", t / "run"], ["--student", "give --teacher"]),
    ("run-own-profile", "argument", "dfkd run with your own pair under the paper's profile",
     lambda w, t: ["run", "--profile", "paper", "--teacher", w.teacher, "--student", "lenet5-half", "--out", t / "run"],
     ["--profile", "quick or tiny"]),
    ("run-weights-no-student", "argument", "dfkd run --weights for a registry network",
     lambda w, t: ["run", "--networks", "lenet5", "--weights", "w.safetensors", "--out", t / "run"],
     ["--student", "your own pair"]),
    ("run-own-no-stats", "argument", "dfkd run with your own teacher that has no BatchNorm and no statistics file",
     lambda w, t: ["run", "--teacher", copy_model(w, t, "nostats"), "--student", "lenet5-half", "--data", w.data,
                   "--out", t / "run"], ["--stats", "no BatchNorm", "nostats.stats.safetensors"]),
    ("run-teacher-code-no-student", "argument", "dfkd run for a paper network given a teacher as code",
     lambda w, t: ["run", "--networks", "lenet5", "--teacher", f"{OWN}:teacher", "--out", t / "run"],
     ["--teacher", "saved teacher", "--student"]),
    ("run-own-random-teacher", "argument", "dfkd run with your own teacher's weights 'random'",
     lambda w, t: ["run", "--teacher", f"{OWN}:teacher", "--weights", "random", "--student", f"{OWN}:student",
                   "--out", t / "run"], ["--weights", "teaches nothing"]),
    ("run-own-other-stats", "argument", "dfkd run with your own teacher and another teacher's statistics",
     lambda w, t: ["run", "--teacher", w.dir / "own", "--code", OWN, "--student", "lenet5-half", "--data", w.data,
                   "--stats", w.stats, "--out", t / "run"], ["teacher.stats.safetensors", "another teacher", "--stats"]),
    ("run-own-normalize-differs", "argument", "dfkd run normalising otherwise than the statistics were recorded",
     lambda w, t: ["run", "--teacher", "lenet5", "--weights", w.dir / "teacher.safetensors", "--normalize",
                   "0.5/0.25", "--student", "lenet5-half", "--data", w.data, "--out", t / "run"],
     ["--normalize", "recorded on inputs normalised by none", "give --normalize none"]),
    ("run-own-student-shape", "argument", "dfkd run with your own student that does not take the data's inputs",
     lambda w, t: ["run", "--teacher", w.teacher, "--student", f"{OWN}:student", "--student-args",
                   '{"in_channels": 3}', "--data", w.data, "--out", t / "run"],
     ["--student", "does not take the data's inputs of shape (1, 32, 32)"]),
    ("run-own-stats-missing", "argument", "dfkd run --stats naming no file",
     lambda w, t: ["run", "--teacher", w.teacher, "--student", "lenet5-half", "--data", w.data, "--stats",
                   t / "none.stats.safetensors", "--out", t / "run"], ["none.stats.safetensors", "no such file"]),
    ("run-iterations-optimise", "argument", "dfkd run --iterations without --synthesis generator",
     lambda w, t: ["run", "--networks", "lenet5", "--iterations", "100", "--out", t / "run"],
     ["--iterations", "give --synthesis generator"]),
    ("run-images-generator", "argument", "dfkd run --images with --synthesis generator",
     lambda w, t: ["run", "--networks", "lenet5", "--synthesis", "generator", "--images", "100", "--out", t / "run"],
     ["--images", "its budget: --iterations"]),
    ("run-seen-views-unknown", "argument", "dfkd run --seen-views naming no view",
     lambda w, t: ["run", "--networks", "lenet5", "--seen-views", "rotate", "--out", t / "run"],
     ["--seen-views", "'rotate' is not shift, affine or none"]),
    ("run-paper-seen-views", "argument", "dfkd run --profile paper with seen views (not the paper's method)",
     lambda w, t: ["run", "--profile", "paper", "--seen-views", "affine", "--out", t / "run"],
     ["--seen-views", "the paper profile runs the paper's method as written"]),
    ("run-teacher-epochs-given", "argument", "dfkd run --teacher-epochs with a teacher given trained",
     lambda w, t: ["run", "--teacher", w.teacher, "--student", "lenet5-half", "--data", w.data, "--teacher-epochs",
                   "5", "--out", t / "run"], ["--teacher-epochs", "is given trained"]),
    ("run-teacher-epochs-teachers", "argument", "dfkd run --teacher-epochs with an earlier run's teachers",
     lambda w, t: ["run", "--networks", "lenet5", "--teachers", t / "earlier", "--teacher-epochs", "5",
                   "--out", t / "run"], ["--teacher-epochs", "--teachers uses an earlier run's teachers as they are"]),
    ("run-teacher-epochs-paper", "argument", "dfkd run --profile paper --teacher-epochs (not the paper's teachers)",
     lambda w, t: ["run", "--profile", "paper", "--teacher-epochs", "5", "--out", t / "run"],
     ["--teacher-epochs", "the paper profile trains the paper's teachers as written"]),
    ("run-temperature-paper", "argument", "dfkd run --profile paper --temperature 4 (not the paper's 8)",
     lambda w, t: ["run", "--profile", "paper", "--temperature", "4", "--out", t / "run"],
     ["--temperature", "the paper profile distils at the paper's temperature, 8"]),
    ("run-lr-paper", "argument", "dfkd run --profile paper --lr (not the paper's 1e-3)",
     lambda w, t: ["run", "--profile", "paper", "--lr", "0.01", "--out", t / "run"],
     ["--lr", "the paper profile distils at the paper's learning rate (Adam, 1e-3)"]),
    ("run-lr-overflow", "argument", "dfkd run --lr whose Adam first step overflows float32",
     lambda w, t: ["run", "--networks", "lenet5", "--lr", "1e39", "--out", t / "run"],
     ["--lr", "1e+39 is too large: Adam's first step (10 x lr) does not fit in float32"]),
    ("run-temperature-huge", "argument", "dfkd run --temperature far above any soft label's use",
     lambda w, t: ["run", "--networks", "lenet5", "--temperature", "1e200", "--out", t / "run"],
     ["--temperature", "is not a number > 0 and <= 1000"]),
    ("distill-temperature-huge", "argument", "dfkd distill --temperature whose square overflows the loss",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--temperature", "1e200", "--out", t / "s"],
     ["--temperature", "is not a number > 0 and <= 1000"]),
    ("run-colour-paper-networks", "argument", "dfkd run --colour drop for the paper's networks (no colour views)",
     lambda w, t: ["run", "--networks", "lenet5", "--colour", "drop", "--out", t / "run"],
     ["--colour", "decides the colour views of your own pair's recipe (--student)"]),
    ("run-synthesis-unknown", "argument", "dfkd run with an unknown synthesis",
     lambda w, t: ["run", "--synthesis", "gan", "--out", t / "run"], ["--synthesis", "invalid choice"]),
    ("run-basis-generator", "argument", "dfkd run --basis fourier for a generator, which makes its inputs itself",
     lambda w, t: ["run", "--synthesis", "generator", "--basis", "fourier", "--out", t / "run"],
     ["--basis", "a generator makes its inputs itself; --basis fourier is for --synthesis optimise"]),
    ("run-basis-vectors", "argument", "dfkd run --basis fourier on a pair whose inputs are not images (before any training)",
     lambda w, t: ["run", "--teacher", "hinton-1200", "--student", "hinton-800", "--basis", "fourier", "--data",
                   _vectors(t), "--out", t / "run"], ["--basis", "the Fourier basis is for images [C, H, W], not inputs of shape [20]"]),
    ("run-basis-paper", "argument", "dfkd run --profile paper --basis fourier (the paper optimises the pixels)",
     lambda w, t: ["run", "--profile", "paper", "--basis", "fourier", "--out", t / "run"],
     ["--basis", "the paper profile optimises the pixels, as the paper does"]),
    ("run-augment-unknown", "argument", "dfkd run --augment with views dfkd does not make",
     lambda w, t: ["run", "--networks", "lenet5", "--augment", "affine+flip", "--out", t / "run"],
     ["--augment", "'affine+flip' is not shift, affine or none, then optionally +mix or +cutmix, +colour and +backdrop"]),
    ("run-data-no-test", "data", "dfkd run on data without a test split (before any training)",
     lambda w, t: ["run", "--teacher", "hinton-1200", "--student", "hinton-800", "--data",
                   _vectors(t, test=False), "--out", t / "run"], ["--data", "has no test split, and dfkd run measures every model on one"]),
    ("run-augment-vectors", "argument", "dfkd run --augment with image views on a pair whose inputs are not images (before any training)",
     lambda w, t: ["run", "--teacher", "hinton-1200", "--student", "hinton-800", "--augment", "affine+cutmix", "--data",
                   _vectors(t), "--out", t / "run"], ["--augment", "affine+cutmix needs images [C, H, W]; these inputs are (20,)"]),
    ("run-augment-vectors-registry", "argument", "dfkd run --augment with image views for a registry network on vectors",
     lambda w, t: ["run", "--networks", "hinton-1200", "--augment", "affine", "--data", _vectors(t), "--out", t / "run"],
     ["--augment", "affine needs images [C, H, W]; these inputs are (20,)"]),
    ("run-colour-nothing-left", "argument", "dfkd run --colour drop where --seen-views and --augment give every view",
     lambda w, t: ["run", "--teacher", "t.py:t", "--weights", "w.safetensors", "--student", "s.py:s", "--colour", "drop",
                   "--seen-views", "affine", "--augment", "affine", "--out", t / "run"],
     ["--colour", "this run has none left to decide"]),
    ("run-augment-paper", "argument", "dfkd run --profile paper --augment affine (the paper distils on the inputs as they are)",
     lambda w, t: ["run", "--profile", "paper", "--augment", "affine", "--out", t / "run"],
     ["--augment", "the paper profile distils on the synthetic inputs as they are, as the paper does"]),
    # user model code
    ("code-missing", "model code", "FILE.py:factory that does not exist",
     lambda w, t: ["train", "--model", f"{t / 'none.py'}:make"], ["none.py:make", "no such file"]),
    ("code-raises", "model code", "code that raises while imported",
     lambda w, t: ["train", "--model", f"{w.dir / 'boom.py'}:make"], ["boom.py:make", "cannot import", "RuntimeError"]),
    ("code-no-factory", "model code", "a file without the named factory",
     lambda w, t: ["train", "--model", f"{OWN}:nothere"], ["own_model.py:nothere", "no callable"]),
    ("code-not-module", "model code", "a factory returning something else than nn.Module",
     lambda w, t: ["train", "--model", f"{w.dir / 'notmodule.py'}:make"], ["notmodule.py:make", "not a torch.nn.Module"]),
    ("code-forward-raises", "model code", "a model whose forward raises",
     lambda w, t: ["train", "--model", f"{w.dir / 'badforward.py'}:make", "--data", w.data, "--out", t / "o"] + T,
     ["badforward.py:", "ValueError", "in your code"]),
    ("code-not-named", "model code", "a saved model made from code the user did not name",
     lambda w, t: ["evaluate", w.dir / "own"], ["own.json", "--code"]),
    # saved models
    ("model-missing", "model .json", "no such model", lambda w, t: ["evaluate", t / "nothing"], ["nothing.json", "no such file"]),
    ("model-not-json", "model .json", "not JSON", lambda w, t: ["evaluate", _write(t / "m.json", "{not json", t / "m")],
     ["m.json", "not valid JSON"]),
    ("model-deep-json", "model .json", "JSON nested 100,000 deep",
     lambda w, t: ["evaluate", _write(t / "m.json", deep(), t / "m")], ["m.json", "nested deeper"]),
    ("model-format", "model .json", "another format's JSON",
     lambda w, t: ["evaluate", copy_model(w, t, "m", lambda d: d.update(format="keras"))], ["m.json", "not a dfkd model"]),
    ("model-version", "model .json", "a future format version",
     lambda w, t: ["evaluate", copy_model(w, t, "m", lambda d: d.update(version=99))], ["m.json", "version 99"]),
    ("model-huge-args", "model .json", "arguments declaring 10^12 parameters",
     lambda w, t: ["evaluate", copy_model(w, t, "m", lambda d: d["model"].update(spec="hinton-800",
                                                                                  args={"hidden": [10 ** 6, 10 ** 6]}))],
     ["m.json", "declare"]),
    ("model-huge-shape", "model .json", "a data description of 10^12 values",
     lambda w, t: ["evaluate", copy_model(w, t, "m", lambda d: d["data"].update(shape=[1, 10 ** 6, 10 ** 6]))],
     ["m.json", "bad input shape"]),
    ("model-truncated", "model .safetensors", "weights cut short",
     lambda w, t: ["evaluate", copy_model(w, t, "m", weights=(w.dir / "teacher.safetensors").read_bytes()[:1000])],
     ["m.safetensors", "truncated or corrupt"]),
    ("model-tampered", "model .safetensors", "weights changed after saving (sha256)",
     lambda w, t: ["evaluate", copy_model(w, t, "m", weights=_scaled_weights(w, 1.01))], ["m.safetensors", "sha256"]),
    ("model-nan", "model .safetensors", "NaN in the weights",
     lambda w, t: ["evaluate", copy_model(w, t, "m", weights=_scaled_weights(w, float("nan")))], ["m.safetensors", "NaN"]),
    ("weights-pickle", "--weights .pt", "a pickle that would run code",
     lambda w, t: ["record", "--teacher", "lenet5", "--weights", pickle_payload(t), "--out", t / "s"],
     ["evil.pt", "not a readable state dict"]),
    ("weights-mismatch", "--weights .pt", "a state dict for another network",
     lambda w, t: ["record", "--teacher", "hinton-800", "--weights", _state_dict(w, t), "--out", t / "s"],
     ["sd.pt", "do not fit the model"]),
    ("state-corrupt", "resume state .state.safetensors", "a damaged resume file",
     lambda w, t: ["train", "--data", w.data, "--out", _write(t / "m.state.safetensors", b"PK\3\4junk", t), "--name",
                   "m", "--epochs", "1"] + T,
     ["m.state.safetensors", "cannot resume", "--restart"]),
    # published folders and hub references
    ("folder-missing-part", "model folder", "a published folder without its statistics",
     lambda w, t: ["reconstruct", "--teacher", _folder_copy(w, t, lambda d: (d / "stats.safetensors").unlink()),
                   "--out", t / "r"], ["pub", "missing stats.safetensors"]),
    ("folder-is-a-trained-model", "model folder", "the folder dfkd train --out wrote, not its model's stem",
     lambda w, t: ["reconstruct", "--teacher", copy_model(w, _dir(t / "trained"), "teacher").parent, "--out", t / "r"],
     ["trained", "missing config.json", "it holds the trained model ", "trained/teacher: pass that instead"]),
    ("folder-holds-models", "model folder", "a folder of two trained models and another file pair",
     lambda w, t: ["reconstruct", "--teacher", _two_models(w, t / "two"), "--out", t / "r"],
     ["two: not a complete", "the trained models ", "two/student, ", "two/teacher: pass one of them"]),
    ("folder-newer-format", "model folder", "a folder of a newer format version",
     lambda w, t: ["reconstruct", "--teacher", _folder_copy(w, t, lambda d: _edit_json(d / "config.json", version=2)),
                   "--out", t / "r"], ["config.json", "newer"]),
    ("folder-code-not-named", "model folder", "a folder whose config names code the user did not name",
     lambda w, t: ["reconstruct", "--teacher", _folder_copy(w, t, lambda d: _edit_json(
         d / "config.json", model={"spec": "my_models.py:net", "args": {}, "code_sha256": "0" * 64})),
                   "--out", t / "r"], ["config.json", "--code my_models.py"]),
    ("folder-other-stats", "model folder", "a folder whose statistics were recorded on other weights",
     lambda w, t: ["reconstruct", "--teacher", _folder_copy(w, t, lambda d: _other_weights(w, d)), "--out", t / "r"],
     ["stats.safetensors", "another teacher"]),
    ("publish-exists", "argument", "dfkd publish onto a folder that exists",
     lambda w, t: ["publish", "--teacher", w.teacher, "--out", _write(t / "x.txt", "x").parent], ["exists"]),
    ("publish-other-stats", "stats file", "dfkd publish with statistics of other weights",
     lambda w, t: ["publish", "--teacher", copy_model(w, t, "m", weights=_scaled_weights(w, 1.01),
                                                      desc_edit=lambda d: d.pop("sha256")),
                   "--stats", w.stats, "--out", t / "pubx"], ["teacher.stats.safetensors", "another teacher"]),
    ("hub-bad-reference", "argument", "a hub reference without ORG/NAME",
     lambda w, t: ["reconstruct", "--teacher", "hf:justaname", "--out", t / "r"], ["hf:justaname", "ORG/NAME"]),
    # statistics files
    ("stats-truncated", "stats file", "cut short", lambda w, t: ["inspect", _write(t / "in.safetensors",
                                                                                   w.stats.read_bytes()[:-50])],
     ["in.safetensors", "truncated or corrupt"]),
    ("stats-not-dfkd", "stats file", "a safetensors file without dfkd's header",
     lambda w, t: ["inspect", _write(t / "in.safetensors", st_save({"a": torch.zeros(2)}))], ["in.safetensors", "no dfkd header"]),
    ("stats-deep-header", "stats file", "header JSON nested 100,000 deep",
     lambda w, t: ["inspect", stats_with_header(w, t, raw_header=deep())], ["x.stats.safetensors", "nested deeper"]),
    ("stats-deep-reconstruct", "stats file", "the same, given to reconstruct",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--stats", stats_with_header(w, t, raw_header=deep()),
                   "--out", t / "r"], ["x.stats.safetensors", "nested deeper"]),
    ("stats-header-types", "stats file", "header fields of the wrong type",
     lambda w, t: ["inspect", stats_with_header(w, t, lambda h: h.update(num_classes="ten", layers=7))],
     ["x.stats.safetensors", "header"]),
    ("stats-layer-stat", "stats file", "a linear layer's statistics said to be per channel",
     lambda w, t: ["inspect", stats_with_header(w, t, lambda h: h["layers"][-1].update(stat="channel"))],
     ["x.stats.safetensors", "layers[4]", "'linear' layer with stat 'channel'"]),
    ("stats-layer-dim", "stats file", "a recorded layer's dim that its shape and stat do not give",
     lambda w, t: ["inspect", stats_with_header(w, t, lambda h: h["layers"][0].update(dim=7))],
     ["x.stats.safetensors", "layers[0].dim 7", "does not follow"]),
    ("stats-norms-type", "stats file", "a header whose norm layers are not a list",
     lambda w, t: ["inspect", stats_with_header(w, t, lambda h: h.update(norms={"path": "ln"}))],
     ["x.stats.safetensors", "norms must list the norm layers"]),
    ("stats-no-recorded-on", "stats file", "header without its provenance",
     lambda w, t: ["inspect", stats_with_header(w, t, lambda h: h.pop("recorded_on"))], ["x.stats.safetensors", "recorded_on"]),
    ("stats-privacy-header", "stats file", "a privacy header with missing fields",
     lambda w, t: ["inspect", stats_with_header(w, t, lambda h: h.update(privacy={"epsilon": 1, "delta": 1e-6,
                                                                                   "events": "all"}))],
     ["x.stats.safetensors", "privacy"]),
    ("stats-tampered", "stats file", "tensors altered after recording",
     lambda w, t: ["inspect", stats_with_header(w, t, tensors_edit=lambda d: d.update({k: v * 1.01 for k, v in d.items()
                                                                                    if k.endswith("mean")}))],
     ["x.stats.safetensors", "sha256"]),
    ("stats-nan", "stats file", "NaN in the statistics",
     lambda w, t: ["inspect", stats_with_header(w, t, tensors_edit=lambda d: d.update({"top-layer/mean": d["top-layer/mean"]
                                                                                    * float("nan")}))],
     ["x.stats.safetensors", "NaN"]),
    ("stats-huge-declared", "stats file", "header declaring 10^6 classes of 10^6 dimensions",
     lambda w, t: ["inspect", stats_with_header(w, t, lambda h: h.update(num_classes=10 ** 6))], ["x.stats.safetensors"]),
    ("stats-other-teacher", "stats file", "recorded on another teacher",
     lambda w, t: ["reconstruct", "--teacher", copy_model(w, t, "m", weights=_scaled_weights(w, 1.01),
                                                          desc_edit=lambda d: d.pop("sha256")),
                   "--stats", w.stats, "--out", t / "r"], ["teacher.stats.safetensors", "another teacher"]),
    ("stats-norm-not-in-teacher", "stats file", "norm-stats of a norm layer the teacher does not have",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--stats", _norms_elsewhere(w, t), "--objective", "norm-stats",
                   "--out", t / "r"], ["n.stats.safetensors", "norm layer conv1 (a LayerNorm of 6 features) is not in this teacher (conv1 is a Conv2d)",
                    "record its statistics from this teacher"]),
    ("stats-missing-kind", "stats file", "without the kind the objective needs",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--stats", _record(w, t, "top-layer"), "--objective",
                   "all-layers", "--out", t / "r"], ["top.stats.safetensors", "--kinds all-layers"]),
    # synthetic sets
    ("syn-no-manifest", "synthetic set", "a folder without manifest.json",
     lambda w, t: ["distill", "--synthetic", t, "--out", t / "s"], ["manifest.json", "not a synthetic set"]),
    ("syn-no-shards", "manifest.json", "without its shards list (was a KeyError)",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, lambda m: m.pop("shards") and None), "--out", t / "s"],
     ["manifest.json", "shards"]),
    ("syn-shards-type", "manifest.json", '"shards": "x" (was a TypeError)',
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, lambda m: m.update(shards="x")), "--out", t / "s"],
     ["manifest.json", "shards"]),
    ("syn-traversal", "manifest.json", "a shard path leaving the folder",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, lambda m: m["shards"][0].update(file="../../etc/passwd")),
                   "--out", t / "s"], ["manifest.json", "shards"]),
    ("syn-data-type", "manifest.json", "a data description of the wrong type",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, lambda m: m.update(data=[1, 2])), "--out", t / "s"],
     ["manifest.json", "data"]),
    ("syn-deep", "manifest.json", "nested 100,000 deep",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, lambda m: deep()), "--out", t / "s"],
     ["manifest.json", "nested deeper"]),
    ("syn-incomplete", "manifest.json", "an unfinished set",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, lambda m: m.update(complete=False)), "--out", t / "s"],
     ["manifest.json", "incomplete"]),
    ("syn-shard-truncated", "shard", "a shard cut short",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, shard_bytes=lambda b: b[:-20]), "--out", t / "s"] + T,
     ["shard-00000.safetensors", "truncated or corrupt"]),
    ("syn-shard-content", "shard", "a shard without the inputs",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, shard_bytes=lambda b: st_save({"y": torch.zeros(3)})),
                   "--out", t / "s"] + T, ["shard-00000.safetensors", "does not hold"]),
    ("syn-shard-nan", "shard", "NaN inputs in a shard",
     lambda w, t: ["distill", "--synthetic", synthetic_copy(w, t, shard_bytes=_nan_shard), "--out", t / "s"] + T,
     ["shard-00000.safetensors", "NaN"]),
    ("syn-student-misfit", "synthetic set", "a set whose inputs do not fit the student",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--student", f"{OWN}:student", "--student-args",
                   '{"in_channels": 3}', "--out", t / "s"] + T, ["--synthetic", "do not fit the student"]),
    ("syn-other-teacher", "synthetic set", "made from another teacher than --teacher",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--teacher", w.dir / "own", "--code", OWN, "--out", t / "s"] + T,
     ["synthetic", "another teacher"]),
    # data: IDX
    ("idx-magic", "IDX", "bad magic number",
     lambda w, t: ["train", "--data", idx_copy(w, t, lambda d: (d / "t10k-labels-idx1-ubyte").write_bytes(b"\1\2\3\4")),
                   "--out", t / "o"], ["t10k-labels-idx1-ubyte", "magic"]),
    ("idx-huge", "IDX", "header declaring 4 x 10^9 images",
     lambda w, t: ["train", "--data", idx_copy(w, t, lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(
         b"\0\0\x08\x03" + (4_000_000_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)),
                   "--out", t / "o"], ["t10k-images-idx3-ubyte", "size mismatch"]),
    ("idx-gzip-bomb", "IDX", "a gzipped file declaring more than it can expand to",
     lambda w, t: ["train", "--data", idx_copy(w, t, lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(
         b"\0\0\x08\x03" + (60_000_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 1000))),
                   "--out", t / "o"], ["train-images-idx3-ubyte.gz", "size mismatch"]),
    ("idx-count", "IDX", "more labels than images",
     lambda w, t: ["train", "--data", idx_copy(w, t, lambda d: write_idx(d / "t10k-labels-idx1-ubyte",
                                                                         np.zeros(501, np.uint8))), "--out", t / "o"],
     ["idx", "500 images but 501 labels"]),
    # data: image folders
    ("folder-missing", "image folder", "no such folder",
     lambda w, t: ["train", "--data", f"folder:{t / 'nowhere'}"], ["nowhere", "not a directory"]),
    ("folder-one-class", "image folder", "a single class folder",
     lambda w, t: ["train", "--data", f"folder:{folder(t, classes=('a',))}", "--out", t / "o"], ["imgs", "two class"]),
    ("folder-corrupt", "image folder", "an image file that is not an image",
     lambda w, t: ["train", "--data", f"folder:{_corrupt_image(folder(t))}", "--out", t / "o"] + T,
     ["1.png", "cannot read this image"]),
    ("folder-size", "image folder", "images of different sizes",
     lambda w, t: ["train", "--data", f"folder:{_odd_size(folder(t))}", "--out", t / "o"] + T, ["2.png", "the others"]),
    ("folder-bomb", "image folder", "a PNG declaring 10^10 pixels (decompression bomb)",
     lambda w, t: ["train", "--data", f"folder:{_bomb(folder(t))}", "--out", t / "o"] + T, ["0.png", "cannot read"]),
    # data: npz
    ("npz-not-zip", "npz", "not a zip file", lambda w, t: ["train", "--data", f"npz:{_write(t / 'd.npz', b'hello')}",
                                                            "--out", t / "o"], ["d.npz", "not an .npz"]),
    ("npz-no-y", "npz", "without labels", lambda w, t: ["train", "--data", npz(t, x=np.zeros((4, 8, 8), np.uint8)),
                                                         "--out", t / "o"], ["d.npz", "needs arrays x and y"]),
    ("npz-float-labels", "npz", "labels that are floats (NaN)",
     lambda w, t: ["train", "--data", npz(t, x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, np.nan, 1])),
                   "--out", t / "o"], ["d.npz", "integer"]),
    ("npz-nan-inputs", "npz", "NaN in the inputs",
     lambda w, t: ["train", "--data", npz(t, x=np.full((4, 8, 8), np.nan, np.float32), y=np.array([0, 1, 0, 1])),
                   "--out", t / "o"], ["d.npz", "NaN"]),
    ("npz-object", "npz", "an object array (would need pickle)",
     lambda w, t: ["train", "--data", npz(t, x=np.array([None, 1], dtype=object), y=np.array([0, 1])), "--out", t / "o"],
     ["d.npz", "object"]),
    ("npz-huge", "npz", "a member header declaring 10^12 rows",
     lambda w, t: ["train", "--data", f"npz:{_huge_npz(t)}", "--out", t / "o"], ["d.npz", "declares shape"]),
    ("npz-rows", "npz", "x and y of different lengths",
     lambda w, t: ["train", "--data", npz(t, x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 1])), "--out", t / "o"],
     ["d.npz", "4 rows but y has 3"]),
    # environment
    ("env-unwritable", "environment", "an output folder that cannot be created",
     lambda w, t: ["record", "--teacher", w.teacher, "--out", "/proc/dfkd-nowhere/s.safetensors"] + T,
     ["/proc/dfkd-nowhere", "cannot write"]),
    ("env-file-in-way", "environment", "a file where the output folder should be",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--out", _write(t / "afile", "x") / "sub", "--images", "10"] + T,
     ["afile/sub", "cannot write"]),
    ("env-mnist-broken", "environment", "$DFKD_MNIST naming a damaged file",
     lambda w, t: ["train", "--out", t / "o"], ["bad.whl", "cannot read MNIST"]),
]
# cases added by area, each module a CASES list of the same shape (and optionally ENV)
from tests import bad_cases_deploy, bad_cases_privacy, bad_cases_resume, bad_cases_user  # noqa: E402
CASES += bad_cases_privacy.CASES + bad_cases_resume.CASES + bad_cases_user.CASES + bad_cases_deploy.CASES
# cases this machine cannot pose: id -> why (skipped by the matrix, and where the answers are compared)
SKIP = {"arg-device": "this machine has CUDA"} if torch.cuda.is_available() else {}
for _area in (bad_cases_privacy, bad_cases_resume, bad_cases_user, bad_cases_deploy):
    SKIP.update(getattr(_area, "SKIP", {}))
ENV = {"env-mnist-broken": lambda t: {"DFKD_MNIST": str(_write(t / "bad.whl", b"PK junk")), "DFKD_CACHE": str(t / "c")}}
# each in a process of its own (the tests below): the real entry point under a file-size limit (a
# full disk), and a second run while another holds the output
SUBPROCESS = [
    ("env-disk-full", "environment", "the disk fills while writing (file-size limit)", ["record"], ["cannot write"]),
    ("env-locked", "environment", "a second run on an output folder in use", ["reconstruct"], ["another dfkd run"]),
]


def _write(path: Path, data, ret: Path | None = None) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return ret or path


def _scaled_weights(w, factor) -> bytes:
    from safetensors.torch import load
    t = load((w.dir / "teacher.safetensors").read_bytes())
    t["conv1.weight"] = t["conv1.weight"] * factor
    return st_save(t)


def _two_models(w, d: Path) -> Path:
    """A folder with the models ``student`` and ``teacher``, and a JSON beside weights that is no model's."""
    for name in ("teacher", "student"):
        copy_model(w, _dir(d), name)
    (d / "results.json").write_text(json.dumps({"format": "something else"}))
    (d / "results.safetensors").write_bytes((d / "teacher.safetensors").read_bytes())
    return d


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _folder_copy(w, t, edit) -> Path:
    import shutil
    shutil.copytree(w.folder, t / "pub")
    edit(t / "pub")
    return t / "pub"


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **fields)))


def _other_weights(w, d: Path) -> None:
    """The folder's weights swapped for others, its config's sha256 made to match them."""
    from safetensors.torch import load_file
    from dfkd.files import weights_sha256
    (d / "model.safetensors").write_bytes(_scaled_weights(w, 1.01))
    _edit_json(d / "config.json", sha256=weights_sha256(load_file(d / "model.safetensors")))


def _state_dict(w, t) -> Path:
    from safetensors.torch import load  # its order varies from run to run: sorted, torch's answer does not
    torch.save(dict(sorted(load((w.dir / "teacher.safetensors").read_bytes()).items())), t / "sd.pt")
    return t / "sd.pt"


def _record(w, t, kinds) -> Path:
    out = t / "top.stats.safetensors"
    record_file(ModelRef(str(w.teacher)), DataRef(), out, RecordConfig(kinds=(kinds,)))
    return out


def _vectors(t, test: bool = True) -> str:
    """An npz of 8 vectors (20 features, 2 classes), with a test split (the same vectors) or without one."""
    x, y = np.linspace(0, 1, 8 * 20, dtype=np.float32).reshape(8, 20), np.arange(8) % 2
    return npz(t, x=x, y=y, **(dict(x_test=x, y_test=y) if test else {}))


def _vector_set(t) -> Path:
    """A synthetic set of vectors (20 features): Hinton-1200 trained one epoch on an npz of vectors, its
    statistics recorded, four inputs made of one step."""
    data = _vectors(t)
    for argv in (["train", "--model", "hinton-1200", "--data", data, "--epochs", "1", "--out", t / "v"],
                 ["record", "--teacher", t / "v" / "teacher", "--data", data],
                 ["reconstruct", "--teacher", t / "v" / "teacher", "--objective", "top-layer", "--images", "4",
                  "--steps", "1", "--out", t / "vs"]):
        assert main([str(a) for a in argv + T]) == 0
    return t / "vs"


def _nan_shard(raw: bytes) -> bytes:
    from safetensors.torch import load
    t = load(raw)
    t["x"][0, 0, 0, 0] = float("nan")
    return st_save(t)


def _corrupt_image(root: Path) -> Path:
    (root / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _odd_size(root: Path) -> Path:
    from PIL import Image
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "b" / "2.png")
    return root


def _bomb(root: Path) -> Path:
    png_bomb(root / "a" / "0.png")
    return root


def _huge_npz(t) -> Path:
    import zipfile  # the member rewritten with its header's shape changed, the zip itself consistent
    p = t / "d.npz"
    np.savez(p, x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 0, 1]))
    with zipfile.ZipFile(p) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["x.npy"] = members["x.npy"].replace(b"(4, 8, 8), }", b"(999999999999, 8, 8), }")
    with zipfile.ZipFile(p, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return p


def outcome(argv, capsys, monkeypatch=None, env=None) -> tuple[int, str]:
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def check_one_line(code: int, err: str, needles) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dfkd: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def no_partial_output(tmp: Path) -> None:
    """Nothing half-written: no temp file, and no output beside the inputs the case wrote."""
    assert not [p for p in tmp.rglob("*.dfkd-tmp")], list(tmp.rglob("*.dfkd-tmp"))
    for name in ("o.safetensors", "s.safetensors", "r", "run", "o.json", "s.json", "PWNED", "o.onnx", "c.npz"):
        assert not (tmp / name).exists(), name


def normalise(answer: str, w, case_dir: Path, cid: str) -> str:
    """An answer as docs/robustness.md states it, wherever things live: the world's folder as
    ``…/world``, its IDX data as ``…/idx``, the case's own folder as ``…/<id>``, the repository as
    ``<repo>``; ``|`` escaped for the table."""
    places = {Path(w.dir): "…/world", Path(w.idx): "…/idx", Path(case_dir): f"…/{cid}", ROOT: "<repo>"}
    for path, token in sorted(places.items(), key=lambda p: -len(str(p[0]))):
        answer = answer.replace(str(path), token)
    return answer.replace("|", "\\|")


def row(case, answer: str, code: int) -> str:
    """A case's row of the table in docs/robustness.md."""
    cid, what, how = case[:3]
    return f"| `{cid}` | {what} | {how} | `{answer}` (exit {code}) |"


def subprocess_row(case) -> str:
    cid, what, how, _, needles = case
    return f"| `{cid}` | {what} | {how} | one line holding {', '.join(repr(n) for n in needles)} (exit 2) |"


ANSWERS: dict[str, tuple[str, int]] = {}  # id -> (normalised answer, exit code), as this session's matrix saw them


def run_case(case, w, tmp: Path, capsys, monkeypatch) -> tuple[int, str]:
    """Run one in-process case; its answer is noted in ``ANSWERS`` for test_matrix_is_documented."""
    cid, _, _, build, _ = case
    argv = build(w, tmp)
    code, err = outcome(argv, capsys, monkeypatch, ENV[cid](tmp) if cid in ENV else None)
    ANSWERS[cid] = (normalise(err.strip(), w, tmp, cid), code)
    return code, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, world, tmp_path, capsys, monkeypatch):
    cid, _, _, _, needles = case
    if cid in SKIP:
        pytest.skip(SKIP[cid])
    code, err = run_case(case, world, tmp_path, capsys, monkeypatch)
    check_one_line(code, err, needles)
    no_partial_output(tmp_path)


def test_disk_full_in_its_own_process(world, tmp_path):
    """A full disk: a 64 kB file-size limit makes writes fail with EFBIG (Python ignores SIGXFSZ)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "s.stats.safetensors"
    r = subprocess.run([sys.executable, "-m", "dfkd", "record", "--teacher", str(world.teacher), "--out", str(out),
                        "--quiet"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       preexec_fn=limit, timeout=300)
    check_one_line(r.returncode, r.stderr, [str(out), "cannot write", "too large"])
    assert not out.exists() and not list(tmp_path.glob(".*.dfkd-tmp"))


def test_second_run_refused_and_a_killed_runs_lock_void(world, tmp_path):
    """A run on an output folder whose lock another process holds is refused in one line and writes
    nothing; a run killed with SIGKILL mid-work (at its third write, ``dfkd.faults``) leaves a lock
    that does not block the next one, which finishes the same set as a run of its own."""
    from filelock import FileLock
    from dfkd.synthetic import SyntheticSet

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DFKD_TEST_CRASH_AT", None)
    args = ["reconstruct", "--teacher", str(world.teacher), "--objective", "all-layers", "--images", "60",
            "--batch-size", "10", "--steps", "5", "--quiet"]

    def run(out, **extra):
        return subprocess.run([sys.executable, "-m", "dfkd", *args, "--out", str(out)], capture_output=True,
                              text=True, env=dict(env, **extra), timeout=600)

    (tmp_path / "r").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, filelock; l = filelock.FileLock(sys.argv[1]); "
                               "l.acquire(); print('held', flush=True); sys.stdin.read()", str(tmp_path / "r" / ".dfkd.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # the other process holds the lock from here on
    r = run(tmp_path / "r")
    holder.communicate("")
    check_one_line(r.returncode, r.stderr, [str(tmp_path / "r"), "another dfkd run"])
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".dfkd.lock"]
    assert FileLock(str(tmp_path / "r" / ".dfkd.lock"), timeout=0).acquire()  # released with its holder

    assert run(tmp_path / "one").returncode == 0
    x1, _, _ = SyntheticSet(tmp_path / "one").open().load()
    killed = run(tmp_path / "k", DFKD_TEST_CRASH_AT="3")
    assert killed.returncode == -9, killed.stderr
    assert list((tmp_path / "k").glob("shard-*.safetensors"))  # it was mid-work when killed
    again = run(tmp_path / "k")
    assert again.returncode == 0, again.stderr
    x2, _, _ = SyntheticSet(tmp_path / "k").open().load()
    assert torch.equal(x1, x2)


def test_no_payload_ran(world, tmp_path, capsys):
    """The pickle case again, checking that its payload (creating a file) never ran."""
    code, _ = outcome(["record", "--teacher", "lenet5", "--weights", pickle_payload(tmp_path), "--out", tmp_path / "s"],
                      capsys)
    assert code == 2 and not (tmp_path / "PWNED").exists()


def test_matrix_is_documented(world, tmp_path_factory, capsys, monkeypatch):
    """docs/robustness.md lists every case, and states each in-process case's answer as dfkd gives it
    now, row for row as ``table`` makes it (``python -m tests.test_bad_input`` prints the table).
    The answers test_bad_input_is_one_line noted in this session are compared; a case it did not
    run (this test run alone) is run here."""
    doc = (ROOT / "docs" / "robustness.md").read_text()
    ids = [c[0] for c in CASES] + [c[0] for c in SUBPROCESS]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    missing = [i for i in ids if f"`{i}`" not in doc]
    assert not missing, missing
    documented = {line.split("`")[1]: line for line in doc.splitlines() if line.startswith("| `")}
    wrong = []
    for case in CASES:
        cid = case[0]
        if cid in SKIP:
            continue
        if cid not in ANSWERS:
            with monkeypatch.context() as m:
                run_case(case, world, tmp_path_factory.mktemp(cid), capsys, m)
        want = row(case, *ANSWERS[cid])
        if documented[cid] != want:
            wrong.append(f"docs: {documented[cid]}\nnow:  {want}")
    wrong += [f"docs: {documented[c[0]]}\nnow:  {subprocess_row(c)}" for c in SUBPROCESS
              if documented[c[0]] != subprocess_row(c)]
    assert not wrong, "the documented answers differ (regenerate with python -m tests.test_bad_input):\n" + \
        "\n".join(wrong)


def table(tmp: Path, idx_dir: Path) -> str:
    """The matrix as markdown, from a real run of every in-process case (paths as ``normalise`` writes them)."""
    w = make_world(tmp / "world", idx_dir)
    rows = ["| case | what is read | how it is bad | dfkd's answer (stderr, exit 2) |", "|---|---|---|---|"]
    for case in CASES:
        cid, what, how, build, _ = case
        if cid in SKIP:
            rows.append(f"| `{cid}` | {what} | {how} | (not posed on the machine that made this table: {SKIP[cid]}) |")
            continue
        d = tmp / cid
        d.mkdir()
        old = dict(os.environ)
        os.environ.update(ENV[cid](d) if cid in ENV else {})
        buf = io.StringIO()
        real, sys.stderr = sys.stderr, buf
        try:
            code = main([str(a) for a in build(w, d)])
        finally:
            sys.stderr = real
            os.environ.clear()
            os.environ.update(old)
        rows.append(row(case, normalise(buf.getvalue().strip(), w, d, cid), code))
    rows += [subprocess_row(case) for case in SUBPROCESS]
    return "\n".join(rows)


if __name__ == "__main__":  # python -m tests.test_bad_input: print the matrix for docs/robustness.md
    import tempfile
    from dfkd.digits import mnist_arrays
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        a = mnist_arrays()
        idx = t / "idx"
        idx.mkdir()
        write_idx(idx / "train-images-idx3-ubyte.gz", a["train_x"][:2000], compress=True)
        write_idx(idx / "train-labels-idx1-ubyte", a["train_y"][:2000])
        write_idx(idx / "t10k-images-idx3-ubyte", a["test_x"][:500])
        write_idx(idx / "t10k-labels-idx1-ubyte", a["test_y"][:500])
        print(table(t, idx))


def test_readme_counts_the_cases():
    """The README's count of tested bad-input cases is this matrix's (it had fallen behind, at 147 of 215)."""
    said = re.search(r"(\d+) cases are tested", (ROOT / "README.md").read_text())
    assert said and int(said.group(1)) == len(CASES) + len(SUBPROCESS), said
