"""Bad-input cases for the matrix in tests/test_bad_input.py (this area's share): each a tuple
(id, what is read, how it is bad, argv builder (w, tmp) -> argv, words the one line must hold).

Resuming: a resume state or a shard with one bit flipped, work made with other settings (a resume
state, a finished model, a synthetic set), and training or reconstruction that diverges."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dfkd.resume import save_state

T = ["--quiet"]
# the world's synthetic set's own settings (tests/conftest.py): a resume of it
REC = ["--objective", "spectral-pairs", "--images", "20", "--batch-size", "10", "--steps", "2"]


def _flip(path: Path) -> Path:
    """The lowest bit of the middle byte flipped (in the tensors' data; a float stays finite)."""
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))
    return path


def _state(t: Path, damaged: bool = False) -> Path:
    """A resume state as training writes it (a small network's, settings of another run) at
    ``t/prev.state.safetensors``."""
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 10)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 64)).sum().backward()
    opt.step()
    p = t / "prev.state.safetensors"
    save_state(p, net, opt, 1, [{"epoch": 1, "loss": 2.3}], {"verb": "train", "config": {"lr": 0.5}})
    return _flip(p) if damaged else p


def _finished(w, t: Path) -> Path:
    """The world's teacher (trained with ``--epochs 1`` on ``w.data``) copied to ``t/prev``: a
    finished model with its settings."""
    for suffix in (".json", ".safetensors"):
        shutil.copy(w.dir / f"teacher{suffix}", t / f"prev{suffix}")
    return t


def changed_idx(w, d: Path) -> Path:
    """A copy of the world's IDX folder with one training label changed (a copy alone is the same data)."""
    shutil.copytree(w.idx, d)
    labels = d / "train-labels-idx1-ubyte"
    b = bytearray(labels.read_bytes())
    b[8 + 100] = (b[8 + 100] + 1) % 10
    labels.write_bytes(bytes(b))
    return d


def _damaged_model(w, t: Path) -> Path:
    """The world's teacher copied to ``t/prev`` with one bit of its weights flipped."""
    _flip(_finished(w, t) / "prev.safetensors")
    return t


def _manifest(w, t: Path, text: str) -> Path:
    """The world's synthetic set with ``text`` as its manifest."""
    d = _syn(w, t)
    (d / "manifest.json").write_text(text)
    return d


def _legacy(path: Path) -> Path:
    """An old-format ``.pt`` resume state whose unpickling would create ``<path>.ran``."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(path) + ".ran", "w"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"epoch": Boom()}))
    return path


def _syn(w, t: Path, edit=None) -> Path:
    d = t / "syn"
    shutil.copytree(w.synthetic, d)
    if edit:
        edit(d / "shard-00000.safetensors")
    return d


def _unsealed(shard: Path) -> None:
    """The shard's tensors rewritten without the header that holds their sha256."""
    shard.write_bytes(st_save(st_load(shard.read_bytes())))


CASES: list = [
    ("resume-state-bitflip", "resume state", "one bit flipped in the middle",
     lambda w, t: ["train", "--data", w.data, "--out", _state(t, damaged=True).parent, "--name", "prev",
                   "--epochs", "1"] + T, ["prev.state.safetensors", "damaged (sha256 mismatch)", "--restart"]),
    ("resume-state-other-settings", "resume state", "written by a run with other settings",
     lambda w, t: ["train", "--data", w.data, "--out", _state(t).parent, "--name", "prev", "--epochs", "1"] + T,
     ["prev.state.safetensors", "cannot resume", "other settings", "--restart"]),
    ("train-finished-other-lr", "finished model", "train again onto a finished model with another --lr",
     lambda w, t: ["train", "--data", w.data, "--out", _finished(w, t), "--name", "prev", "--epochs", "1",
                   "--lr", "0.002"] + T,
     ["prev.json", "finished model made with other settings", "lr 0.001 -> 0.002", "--restart"]),
    ("train-finished-other-data", "finished model", "train again onto a finished model with another --data",
     lambda w, t: ["train", "--data", f"idx:{changed_idx(w, t / 'idx')}", "--out", _finished(w, t), "--name",
                   "prev", "--epochs", "1"] + T, ["prev.json", "other settings", "content_sha256", "--restart"]),
    ("train-finished-damaged", "finished model", "one bit of the finished weights flipped, train again (was kept)",
     lambda w, t: ["train", "--data", w.data, "--out", _damaged_model(w, t), "--name", "prev", "--epochs", "1"] + T,
     ["prev.safetensors", "sha256 mismatch", "delete", "--restart"]),
    ("distill-finished-damaged", "finished model", "one bit of a finished student's weights flipped",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--out", _damaged_model(w, t) / "prev", "--epochs",
                   "1"] + T, ["prev.safetensors", "sha256 mismatch", "--restart"]),
    ("manifest-not-json", "synthetic set", "manifest.json cut short (was no remedy)",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, *REC, "--out", _manifest(w, t, '{"broken')] + T,
     ["manifest.json", "not valid JSON", "delete", "--restart"]),
    ("manifest-list", "synthetic set", "manifest.json a list",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, *REC, "--out", _manifest(w, t, "[]")] + T,
     ["manifest.json", "delete", "--restart"]),
    ("manifest-no-shards", "synthetic set", "manifest.json without shards",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, *REC, "--out", _manifest(w, t, '{"config": 5}')] + T,
     ["manifest.json", "delete", "--restart"]),
    ("resume-state-old-format", "resume state", "a .state.pt of the previous version (was silently ignored)",
     lambda w, t: ["train", "--data", w.data, "--out", _legacy(t / "prev.state.pt").parent, "--name", "prev",
                   "--epochs", "1"] + T, ["prev.state.pt", "old-format resume state", "delete it", "--restart"]),
    ("run-state-old-format", "resume state", "run's state/train-teacher.pt of the previous version",
     lambda w, t: ["run", "--profile", "tiny", "--networks", "lenet5", "--data", w.data, "--out",
                   _legacy(t / "prev" / "lenet5" / "state" / "train-teacher.pt").parent.parent.parent] + T,
     ["train-teacher.pt", "old-format resume state", "delete it", "--restart"]),
    ("distill-finished-other", "finished model", "distill onto a finished model made otherwise",
     lambda w, t: ["distill", "--synthetic", w.synthetic, "--out", _finished(w, t) / "prev", "--epochs", "1"] + T,
     ["prev.json", "other settings", "--restart"]),
    ("shard-bitflip-distill", "shard", "one bit flipped in the middle, read by distill",
     lambda w, t: ["distill", "--synthetic", _syn(w, t, _flip), "--out", t / "s", "--epochs", "1"] + T,
     ["shard-00000.safetensors", "damaged (sha256 mismatch)", "dfkd reconstruct"]),
    ("shard-bitflip-resume", "shard", "one bit flipped in the middle, found by a resume",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, *REC, "--out", _syn(w, t, _flip)] + T,
     ["shard-00000.safetensors", "damaged (sha256 mismatch)", "--restart"]),
    ("shard-no-sha256", "shard", "tensors rewritten without the header's sha256",
     lambda w, t: ["distill", "--synthetic", _syn(w, t, _unsealed), "--out", t / "s", "--epochs", "1"] + T,
     ["shard-00000.safetensors", "no sha256"]),
    ("syn-other-settings", "synthetic set", "reconstruct again into a set made with other --steps",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, *REC, "--steps", "3", "--out", _syn(w, t)] + T,
     ["syn", "other settings", "steps 2 -> 3", "--restart"]),
    ("train-loss-nan", "argument", "--lr 1e30: the loss stops being finite",
     lambda w, t: ["train", "--data", w.data, "--lr", "1e30", "--epochs", "1", "--batch-size", "500",
                   "--out", t / "o"] + T, ["--lr", "the loss became", "at epoch 1, step", "nothing was saved"]),
    ("reconstruct-nonfinite", "argument", "--init-std 1e39 --no-clamp: the inputs overflow (was a shard of inf)",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "noise", "--images", "10",
                   "--init-std", "1e39", "--no-clamp", "--out", t / "nan"] + T,
     ["--init-std", "NaN or infinite", "batch 0"]),
    ("reconstruct-lr-overflow", "argument", "--lr 1e39: Adam's step overflows float32 (was 'a dfkd bug')",
     lambda w, t: ["reconstruct", "--teacher", w.teacher, "--objective", "top-layer", "--images", "10",
                   "--lr", "1e39", "--out", t / "nan"] + T, ["--lr", "too large"]),
]
ENV: dict = {}
