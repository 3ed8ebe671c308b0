"""Shared fixtures: real MNIST (the packaged copy), small subsets, a small teacher trained once."""
from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dfkd.config import RecordConfig, TrainConfig
from dfkd.data import as_batches, open_data
from dfkd.models import build_model
from dfkd.recording import record
from dfkd.training import train

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent


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
    train(model, small.train, TrainConfig(epochs=3, lr=3e-3, seed=0, progress=False))
    return model.eval()


@pytest.fixture(scope="session")
def meta(teacher, small):
    """All four kinds on the small teacher; conv maps per unit (the paper's form)."""
    return record(teacher, small.train, RecordConfig(conv_stats="unit", progress=False), small.info)


def write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> None:
    header = b"\0\0\x08" + bytes([arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    """2,000 training and 500 test images of real MNIST as standard IDX files."""
    from dfkd.sources import mnist_arrays
    a = mnist_arrays()
    d = tmp_path_factory.mktemp("idx")
    write_idx(d / "train-images-idx3-ubyte.gz", a["train_x"][:2000], compress=True)
    write_idx(d / "train-labels-idx1-ubyte", a["train_y"][:2000])
    write_idx(d / "t10k-images-idx3-ubyte", a["test_x"][:500])
    write_idx(d / "t10k-labels-idx1-ubyte", a["test_y"][:500])
    return d


@pytest.fixture(scope="session")
def colour_dir(tmp_path_factory) -> Path:
    """Colourised MNIST digits, 32x32 RGB, as an image folder (2,000 train, 500 test), written by
    examples/colour_digits.py as a user would."""
    import subprocess
    import sys
    d = tmp_path_factory.mktemp("colour")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "colour_digits.py"), str(d), "--train", "2000",
                        "--test", "500"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d
