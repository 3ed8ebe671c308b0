"""Bad-input cases for the matrix in tests/test_bad_input.py (this area's share): each a tuple
(id, what is read, how it is bad, argv builder (w, tmp) -> argv, words the one line must hold).

The private record's refusals: a header value that would be read off the examples (a float npz
set's range, ``--normalize auto``), a declared range that is no range or does not hold the data,
and the default delta on a set too large for it."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def float_npz(tmp: Path, n: int = 30, shape: tuple[int, ...] = (28, 28)) -> str:
    """Float inputs in [0, 1] (so their range is read off the data), labels 0..9 (or 0..1 for vectors)."""
    g = np.random.default_rng(0)
    classes = 10 if len(shape) > 1 else 2
    np.savez(tmp / "f.npz", x=g.random((n, *shape), dtype=np.float32), y=np.arange(n) % classes)
    return f"npz:{tmp / 'f.npz'}"


def teacher_normalised(w, tmp: Path, origin: str | None) -> str:
    """A copy of the world's teacher whose model file states a non-identity normalisation made by ``origin``
    (``data``: dfkd train --normalize auto; None: an older file that does not say)."""
    import json
    import shutil
    shutil.copy(f"{w.teacher}.safetensors", tmp / "t.safetensors")
    desc = json.loads(Path(f"{w.teacher}.json").read_text())
    desc["data"] |= {"mean": [0.1307], "std": [0.3081]}
    desc["data"].pop("normalisation_origin", None)
    if origin is not None:
        desc["data"]["normalisation_origin"] = origin
    (tmp / "t.json").write_text(json.dumps(desc))
    return str(tmp / "t")


CASES: list = [
    ("arg-range-float32", "argument", "--range=-1e300,1e300 with --privacy (beyond float32, the statistics' type)",
     lambda w, t: ["record", "--teacher", w.teacher, "--privacy", "1", "--range=-1e300,1e300", "--out", t / "s"],
     ["--range", "finite in float32"]),
    ("arg-range-not-format", "argument", "--range 0,255 on 8-bit images, whose range the format fixes at 0..1",
     lambda w, t: ["record", "--teacher", w.teacher, "--range", "0,255", "--out", t / "s"],
     ["--range", "fixed by its format", "--range 0,1"]),
    ("arg-privacy-teacher-auto", "teacher", "--privacy with a teacher trained with --normalize auto (its model file "
     "says so: the data's exact mean and std)",
     lambda w, t: ["record", "--teacher", teacher_normalised(w, t, "data"), "--privacy", "1", "--out", t / "s"],
     ["--teacher", "--normalize auto", "retrain", "MEAN/STD"]),
    ("arg-privacy-teacher-unknown-norm", "teacher", "--privacy with an older teacher file that does not say where "
     "its normalisation (not mean 0 / std 1) came from",
     lambda w, t: ["record", "--teacher", teacher_normalised(w, t, None), "--privacy", "1", "--out", t / "s"],
     ["--teacher", "does not say", "retrain", "MEAN/STD"]),
    ("arg-range-syntax", "argument", "--range 1,0 (not LOW < HIGH)",
     lambda w, t: ["record", "--teacher", w.teacher, "--range", "1,0", "--out", t / "s"], ["--range", "LOW,HIGH"]),
    ("arg-range-narrow", "argument", "--range narrower than the data's values (8-bit images: 0..1)",
     lambda w, t: ["record", "--teacher", w.teacher, "--range", "0,0.5", "--out", t / "s"],
     ["--range", "does not hold the data's values"]),
    ("arg-privacy-float-range", "argument", "--privacy on a float npz set without --range (its range would be "
     "read off the examples)",
     lambda w, t: ["record", "--teacher", w.teacher, "--data", float_npz(t), "--privacy", "1", "--out", t / "s"],
     ["--range", "needed with --privacy"]),
    ("arg-privacy-normalize-auto", "argument", "--privacy with --normalize auto (the data's exact mean and std)",
     lambda w, t: ["record", "--teacher", "lenet5", "--weights", "random", "--data", w.data, "--normalize", "auto",
                   "--privacy", "1", "--out", t / "s"], ["--normalize", "auto", "MEAN/STD"]),
    ("arg-privacy-delta-large", "argument", "--privacy without --delta on more than 100,000 examples",
     lambda w, t: ["record", "--teacher", "hinton-1200", "--teacher-args", '{"hidden": [4]}', "--weights", "random",
                   "--data",
                   float_npz(t, 100_001, (2,)), "--range", "0,1", "--kinds", "top-layer", "--privacy", "1",
                   "--out", t / "s"], ["--delta", "100,000", "give --delta"]),
]
ENV: dict = {}
