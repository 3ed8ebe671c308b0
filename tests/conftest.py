"""Shared fixtures: real MNIST (the packaged copy), small subsets, a small teacher trained once."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dfkd.checkpoint import save_model
from dfkd.config import ReconstructConfig, RecordConfig, TrainConfig
from dfkd.data import as_batches
from dfkd.models import build_model
from dfkd.reconstruction import reconstruct_file
from dfkd.recording import record, record_file
from dfkd.sources import open_data
from dfkd.specs import DataRef, ModelRef
from dfkd.training import train, train_file

# one thread: beside another busy job, two OpenMP threads on two cores spin against each other (a distill
# test took 89 s with two threads and 39 s with one while a 2-thread job ran); DFKD_TEST_THREADS overrides.
# OMP_NUM_THREADS too, so that dfkd's own setup_threads and every dfkd the tests start keep to it
os.environ["OMP_NUM_THREADS"] = os.environ.get("DFKD_TEST_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
for _hook in ("DFKD_TEST_CRASH_AT", "DFKD_TEST_WRITE_LOG"):  # the fault hooks: set only by the tests that mean them
    os.environ.pop(_hook, None)
ROOT = Path(__file__).resolve().parent.parent
OWN = ROOT / "examples" / "own_model.py"


@pytest.fixture(scope="session")
def mnist():
    """All of MNIST as a DataSource (60,000 training and 10,000 test images, 1x28x28)."""
    return open_data("mnist")


@pytest.fixture(scope="session")
def small(mnist):
    """The first 6,000 training and 1,000 test images of real MNIST as LeNet-5 inputs (1x32x32)."""
    info = build_model("lenet5", mnist.info)[1]
    d = open_data("mnist", info=info)
    return SimpleNamespace(train=next(as_batches(d.train, 6000)), test=next(as_batches(d.test, 1000)), info=info)


@pytest.fixture(scope="session")
def teacher(small):
    """LeNet-5 trained (seeded) for 3 epochs on 6,000 real images."""
    torch.manual_seed(0)
    model, _ = build_model("lenet5", small.info)
    train(model, small.train, TrainConfig(epochs=3, lr=3e-3, seed=0))
    return model.eval()


@pytest.fixture(scope="session")
def meta(teacher, small):
    """All four kinds on the small teacher; conv maps per unit (the paper's form)."""
    return record(teacher, small.train, RecordConfig(conv_stats="unit"), small.info)


def write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> None:
    header = b"\0\0\x08" + bytes([arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    """2,000 training and 500 test images of real MNIST as standard IDX files."""
    from dfkd.digits import mnist_arrays
    a = mnist_arrays()
    d = tmp_path_factory.mktemp("idx")
    write_idx(d / "train-images-idx3-ubyte.gz", a["train_x"][:2000], compress=True)
    write_idx(d / "train-labels-idx1-ubyte", a["train_y"][:2000])
    write_idx(d / "t10k-images-idx3-ubyte", a["test_x"][:500])
    write_idx(d / "t10k-labels-idx1-ubyte", a["test_y"][:500])
    return d


@pytest.fixture(scope="session")
def colour_dir(tmp_path_factory) -> Path:
    """Colourised MNIST digits, 32x32 RGB, as an image folder (1,200 train, 300 test), written by
    examples/colour_digits.py as a user would."""
    import subprocess
    import sys
    d = tmp_path_factory.mktemp("colour")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "colour_digits.py"), str(d), "--train", "1200",
                        "--test", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d


def make_world(d: Path, idx_dir: Path) -> SimpleNamespace:
    """A small saved LeNet-5 teacher, its statistics, a synthetic set, and a user-code teacher."""
    data = f"idx:{idx_dir}"
    train_file(ModelRef("lenet5"), DataRef(data), d / "teacher", TrainConfig(epochs=1))
    record_file(ModelRef(str(d / "teacher")), DataRef(), None, RecordConfig())
    reconstruct_file(ModelRef(str(d / "teacher")), str(d / "teacher.stats.safetensors"), d / "synthetic",
                     ReconstructConfig(objective="spectral-pairs", n=20, batch_size=10, steps=2))
    model, info = build_model(f"{OWN}:teacher", build_model("lenet5")[1].fitted((1, 28, 28)), width=4)
    save_model(model, d / "own", f"{OWN}:teacher", {"width": 4}, info)
    from dfkd.publishing import publish
    publish(ModelRef(str(d / "teacher")), d / "teacher.stats.safetensors", d / "pub")
    (d / "boom.py").write_text("raise RuntimeError('nope')\n")
    (d / "notmodule.py").write_text("def make():\n    return 42\n")
    (d / "badforward.py").write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, 10)\n\n    def forward(self, x):\n"
        "        raise ValueError('shape trouble in my forward')\n\n\ndef make():\n    return Net()\n")
    return SimpleNamespace(dir=d, data=data, idx=idx_dir, teacher=d / "teacher", stats=d / "teacher.stats.safetensors",
                           synthetic=d / "synthetic", folder=d / "pub")


@pytest.fixture(scope="session")
def world(tmp_path_factory, idx_dir):
    return make_world(tmp_path_factory.mktemp("world"), idx_dir)


# --- counts that float32 rounding may move: dfkd's figures against float64 counts made in the tests ---
EPS32 = float(torch.finfo(torch.float32).eps)


def near_ties(out64: torch.Tensor, out32: torch.Tensor | None = None) -> torch.Tensor:
    """The samples whose float64 top-2 logit margin is within float32's rounding, whose float32
    prediction (dfkd's, on any kernel and summation order) may therefore be either class. The
    tolerance per sample is 4096 float32 roundings at the scale of its largest logit (1 + max |logit|):
    a LeNet's longest chain of sums is well under 1,000 terms of at most that magnitude per logit,
    doubled for a margin of two logits, and 4x again to spare; at least 10x what float32 gives here."""
    tol = 4096 * EPS32 * (1 + out64.abs().amax(1))
    if out32 is not None:
        tol = torch.maximum(tol, 10 * (out32.double() - out64).abs().amax(1))
    top2 = out64.topk(2, 1).values
    return (top2[:, 0] - top2[:, 1]) < tol


def count_bounds(hit: torch.Tensor, near: torch.Tensor) -> tuple[int, int]:
    """(lowest, highest) number of ``hit`` samples a float32 count may give where the ``near``
    samples may go either way: the certain hits, plus at most every near one."""
    certain = int((hit & ~near).sum())
    return certain, certain + int(near.sum())


def assert_count(figure: float, n: int, hit: torch.Tensor, near: torch.Tensor, what: object) -> int:
    """``figure`` (a share of ``n``) is a whole count within ``count_bounds(hit, near)``; returns it."""
    assert int(near.sum()) <= max(3, n // 100), (what, "too many near ties for the count to mean anything",
                                                  int(near.sum()), n)
    count = round(figure * n)
    lo, hi = count_bounds(hit, near)
    assert abs(figure * n - count) < 1e-6 * n and lo <= count <= hi, (what, figure, count, lo, hi)
    return count
