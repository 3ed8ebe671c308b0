"""Bad-input cases for the matrix in tests/test_bad_input.py (this area's share): each a tuple
(id, what is read, how it is bad, argv builder (w, tmp) -> argv, words the one line must hold)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.conftest import OWN

# models that build but do not give one tensor of logits [N, classes] (inputs: MNIST, 1x28x28, 10 classes)
OUTPUTS = '''import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how = nn.Linear(784, 10), how

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return (y, y.softmax(1)) if self.how == "tuple" else {"logits": y}


def make_tuple():
    return Net("tuple")


def make_dict():
    return Net("dict")


def one_logit():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1))


def logit_vector():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1), nn.Flatten(0))


def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


class TrainDict(nn.Module):
    """Logits in eval mode, a dict in training mode (as torchvision's GoogLeNet gives its aux outputs)."""
    def __init__(self):
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(4), nn.Linear(16, 10)

    def forward(self, x):
        y = self.fc(self.pool(x[:, :1]).flatten(1))
        return {"logits": y, "aux": y} if self.training else y


def train_dict():
    return TrainDict()
'''


def outputs(t: Path, factory: str) -> str:
    (t / "outputs.py").write_text(OUTPUTS)
    return f"{t / 'outputs.py'}:{factory}"


def torch_file(t: Path, name: str, obj) -> Path:
    torch.save(obj, t / name)
    return t / name


def teacher_state(w) -> dict:
    return st_load((w.dir / "teacher.safetensors").read_bytes())


def payload(t: Path):
    """What a whole pickled model could do when unpickled: here, create ``PWNED`` (it must never appear)."""
    class Payload:
        def __reduce__(self):
            return (open, (str(t / "PWNED"), "w"))
    return {"model": Payload()}


def bare_safetensors(w, t: Path) -> Path:
    (t / "w.safetensors").write_bytes(st_save(teacher_state(w)))
    return t / "w.safetensors"


T = ["--quiet"]
CASES: list = [
    # what a user's model returns, checked once where every command builds it (models.check_outputs)
    ("code-returns-tuple", "model code", "a model returning a tuple",
     lambda w, t: ["train", "--model", outputs(t, "make_tuple"), "--data", w.data, "--out", t / "o"] + T,
     ["outputs.py:make_tuple", "returned a tuple", "one tensor of logits [N, 10]"]),
    ("code-returns-dict", "model code", "a teacher returning a dict (record)",
     lambda w, t: ["record", "--teacher", outputs(t, "make_dict"), "--weights", "random", "--data", w.data,
                   "--out", t / "s"] + T, ["outputs.py:make_dict", "returned a dict"]),
    ("code-one-logit", "model code", "a model giving a single logit [N, 1]",
     lambda w, t: ["train", "--model", outputs(t, "one_logit"), "--data", w.data, "--out", t / "o"] + T,
     ["outputs.py:one_logit", "shape (2, 1)", "[N, 10]"]),
    ("code-logit-vector", "model code", "a model giving one logit per input, [N]",
     lambda w, t: ["train", "--model", outputs(t, "logit_vector"), "--data", w.data, "--out", t / "o"] + T,
     ["outputs.py:logit_vector", "shape (2,)", "[N, 10]"]),
    ("code-few-classes", "model code", "a model with fewer outputs (5) than the data's classes (10)",
     lambda w, t: ["train", "--model", outputs(t, "five_classes"), "--data", w.data, "--out", t / "o"] + T,
     ["outputs.py:five_classes", "shape (2, 5)", "[N, 10]"]),
    # ... and what it returns in training mode, which that probe (eval mode) does not see: checked where
    # training and distillation compute the loss (models.train_logits)
    ("code-train-returns-dict", "model code", "a model returning a dict in training mode only (train)",
     lambda w, t: ["train", "--model", outputs(t, "train_dict"), "--data", w.data, "--out", t / "o"] + T,
     ["outputs.py:train_dict", "in training mode", "returned a dict", "[N, classes]"]),
    ("code-train-returns-dict-distill", "model code", "a student returning a dict in training mode only (distill)",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--student", outputs(t, "train_dict"), "--out", t / "s"] + T,
     ["outputs.py:train_dict", "in training mode", "returned a dict", "[N, 10]"]),
    # numbers that are not finite: NaN passes every later range check (cli_parser._finite, _positive)
    ("arg-lr-nan", "argument", "--lr nan (train)",
     lambda w, t: ["train", "--lr", "nan", "--data", w.data, "--out", t / "o"] + T, ["--lr", "'nan' is not a finite number"]),
    ("arg-lr-nan-distill", "argument", "--lr nan (distill)",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--lr", "nan", "--out", t / "s"] + T,
     ["--lr", "'nan' is not a finite number"]),
    ("arg-lr-nan-reconstruct", "argument", "--lr nan (reconstruct)",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--lr", "nan", "--out", t / "r"] + T,
     ["--lr", "'nan' is not a finite number"]),
    ("arg-tv-inf", "argument", "--tv inf (a plain float flag)",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--tv", "inf", "--out", t / "r"] + T,
     ["--tv", "'inf' is not a finite number"]),
    ("arg-adversarial-nan", "argument", "--adversarial nan",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--teacher", w.teacher, "--adversarial", "nan",
                   "--out", t / "s"] + T, ["--adversarial", "'nan' is not a finite number"]),
    # devices torch knows but this machine lacks
    ("arg-device-mps", "argument", "--device mps on a machine without it",
     lambda w, t: ["train", "--device", "mps", "--data", w.data, "--out", t / "o"] + T, ["--device", "mps"]),
    # a teacher given as code without weights: the statistics of a random network
    ("teacher-no-weights", "argument", "--teacher FILE.py:factory without --weights (record)",
     lambda w, t: ["record", "--teacher", f"{OWN}:teacher", "--data", w.data, "--out", t / "s"] + T,
     ["--weights", "random network", "--weights random"]),
    ("teacher-no-weights-registry", "argument", "--teacher of a registry name without --weights (reconstruct)",
     lambda w, t: ["reconstruct", "--teacher", "lenet5", "--stats", w.stats, "--out", t / "r"] + T,
     ["--weights", "lenet5", "--weights random"]),
    # weights given where a saved dfkd model belongs
    ("teacher-state-dict", "--teacher .pt", "a state dict given as the teacher",
     lambda w, t: ["record", "--teacher", torch_file(t, "sd.pt", teacher_state(w)), "--out", t / "s"] + T,
     ["sd.pt", "state dict", "--teacher FILE.py:factory --weights sd.pt"]),
    ("teacher-whole-model", "--teacher .pt", "a whole pickled model (torch.save(model)) given as the teacher",
     lambda w, t: ["reconstruct", "--teacher", torch_file(t, "net.pth", torch.nn.Sequential(torch.nn.Linear(2, 2))),
                   "--out", t / "r"] + T, ["net.pth", "pickled", "state_dict()", "--weights net.pth"]),
    ("teacher-pickle-payload", "--teacher .pt", "a pickle that would run code, given as the teacher",
     lambda w, t: ["evaluate", torch_file(t, "evil.pt", payload(t))], ["evil.pt", "pickled", "not a dfkd model"]),
    ("teacher-bare-safetensors", "--teacher .safetensors", "weights without their dfkd description",
     lambda w, t: ["record", "--teacher", bare_safetensors(w, t), "--out", t / "s"] + T,
     ["w.safetensors", "without the dfkd description", "--weights w.safetensors"]),
    ("teacher-pt-missing", "--teacher .pt", "a .pt file that does not exist",
     lambda w, t: ["record", "--teacher", t / "none.pt", "--out", t / "s"] + T, ["none.pt: no such file"]),
    # a time budget (dfkd run --minutes) that cannot be kept, or that sizes nothing it was given
    ("arg-minutes-networks", "argument", "dfkd run --minutes for the paper's networks (no --student)",
     lambda w, t: ["run", "--minutes", "15", "--out", t / "run"], ["--minutes", "your own pair"]),
    ("arg-minutes-generator", "argument", "dfkd run --minutes with --synthesis generator",
     lambda w, t: ["run", "--teacher", w.teacher, "--student", "lenet5-half", "--data", w.data, "--synthesis",
                   "generator", "--minutes", "15", "--out", t / "run"], ["--minutes", "--iterations"]),
    ("arg-minutes-images", "argument", "dfkd run --minutes with --images (the budget chooses them)",
     lambda w, t: ["run", "--teacher", w.teacher, "--student", "lenet5-half", "--data", w.data, "--images", "100",
                   "--minutes", "15", "--out", t / "run"], ["--minutes", "not both"]),
    ("arg-minutes-nan", "argument", "dfkd run --minutes nan",
     lambda w, t: ["run", "--minutes", "nan", "--out", t / "run"], ["--minutes", "'nan' is not a finite number"]),
    # the optimised inputs' cross-entropy weight
    ("arg-ce-negative", "argument", "dfkd reconstruct --ce below 0",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--stats", w.stats, "--ce", "-1", "--out", t / "r"] + T,
     ["--ce", "finite and >= 0"]),
    ("arg-ce-generator", "argument", "dfkd run --ce with --synthesis generator (a generator has its own)",
     lambda w, t: ["run", "--teacher", w.teacher, "--student", "lenet5-half", "--data", w.data, "--synthesis",
                   "generator", "--ce", "1", "--out", t / "run"], ["--ce", "--synthesis optimise"]),
    ("arg-ce-paper", "argument", "dfkd run --profile paper --ce 1 (the paper's objective alone)",
     lambda w, t: ["run", "--profile", "paper", "--ce", "1", "--out", t / "run"], ["--ce", "paper profile"]),
]
ENV: dict = {}
# cases that cannot be met on this machine: id -> why (the matrix skips them)
SKIP: dict = {"arg-device-mps": "this machine has an MPS device"} if torch.backends.mps.is_available() else {}
