"""Bad-input cases of ``dfkd export`` for the matrix in tests/test_bad_input.py: each a tuple (id, what is
read, how it is bad, argv builder (w, tmp) -> argv, words the one line must hold)."""
from __future__ import annotations

import json

from tests.conftest import OWN

T = ["--quiet"]


def _own(w, t) -> list:
    """The world's user-code teacher (28x28 grey), its code named."""
    return [w.dir / "own", "--code", OWN]


def _other_classes(w, t):
    """The world's synthetic set, its manifest saying 5 classes (the teacher gives 10)."""
    d = t / "syn"
    d.mkdir()
    for f in w.synthetic.iterdir():
        if f.suffix in (".json", ".safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
    m = json.loads((d / "manifest.json").read_text())
    m["data"]["num_classes"] = 5
    m["data"].pop("class_names", None)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _folder(path):
    path.mkdir()
    return path


CASES: list = [
    ("export-out-suffix", "--out", "an output that is not .onnx",
     lambda w, t: ["export", w.teacher, "--out", t / "o.safetensors"] + T, ["--out", "must end in .onnx"]),
    ("export-int8-no-calibration", "--calibration", "--quantize int8 without calibration inputs",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--quantize", "int8"] + T,
     ["--calibration", "int8 needs calibration inputs"]),
    ("export-calibration-unused", "--calibration", "calibration inputs given for a float32 export",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--calibration", w.synthetic] + T,
     ["--calibration", "--quantize int8"]),
    ("export-npz-alone", "--calibration-npz", "--calibration-npz without --calibration",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--calibration-npz", t / "c.npz"] + T,
     ["--calibration-npz", "give --calibration"]),
    ("export-calibration-shape", "--calibration", "a synthetic set of another input shape (32x32 for a 28x28 model)",
     lambda w, t: ["export", *_own(w, t), "--out", t / "o.onnx", "--quantize", "int8", "--calibration", w.synthetic] + T,
     ["synthetic", "shape (1, 32, 32)", "(1, 28, 28)"]),
    ("export-calibration-missing", "--calibration", "a folder that is not a synthetic set",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--quantize", "int8", "--calibration", t] + T,
     ["manifest.json", "not a synthetic set"]),
    ("export-calibration-classes", "--calibration", "a synthetic set made for another class count",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--quantize", "int8", "--calibration",
                   _other_classes(w, t)] + T, ["syn", "5 classes", "gives 10"]),
    ("export-opset-old", "--opset", "an opset older than the exporter writes",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--opset", "11"] + T, ["--opset", "older"]),
    ("export-opset-new", "--opset", "an opset newer than the installed onnx knows",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--opset", "99"] + T, ["--opset", "newer"]),
    ("export-npz-suffix", "--calibration-npz", "the calibration inputs to a file that is not .npz (the model's own)",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--quantize", "int8", "--calibration", w.synthetic,
                   "--calibration-npz", t / "o.onnx"] + T, ["--calibration-npz", "must end in .npz"]),
    ("export-npz-in-set", "--calibration-npz", "the calibration inputs written inside the set they are read from",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--quantize", "int8", "--calibration", w.synthetic,
                   "--calibration-npz", w.synthetic / "c.npz"] + T, ["--calibration-npz", "inside the synthetic set"]),
    ("export-calibration-file", "--calibration", "a shard file given for the set's folder",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--quantize", "int8", "--calibration",
                   w.synthetic / "manifest.json"] + T, ["manifest.json", "is a file", "folder"]),
    ("export-out-folder", "--out", "an output where a folder stands",
     lambda w, t: ["export", w.teacher, "--out", _folder(t / "x.onnx")] + T, ["--out", "a folder stands there"]),
    ("export-saved-with-data", "--data", "--data given for a saved model",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--data", w.data] + T,
     ["--data", "a saved model brings"]),
    ("export-npz-unwritable", "--calibration-npz", "calibration inputs written where a folder stands",
     lambda w, t: ["export", w.teacher, "--out", t / "o.onnx", "--quantize", "int8", "--calibration", w.synthetic,
                   "--calibration-npz", _folder(t / "calib.npz")] + T, ["calib.npz", "cannot write", "a folder stands there"]),
    ("export-spec-no-weights", "model", "a registry name without weights",
     lambda w, t: ["export", "lenet5", "--out", t / "o.onnx"] + T, ["--weights"]),
]
