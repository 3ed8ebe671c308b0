"""Shared fixtures: real MNIST (the packaged copy), small subsets, a small teacher trained once."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd.config import TrainConfig
from dfkd.data import ImageSet, load_mnist
from dfkd.models import build_model
from dfkd.record import record
from dfkd.train import train_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist() -> ImageSet:
    return load_mnist()


@pytest.fixture(scope="session")
def small(mnist) -> ImageSet:
    """The first 6,000 training and 1,000 test images of real MNIST."""
    return ImageSet("mnist", mnist.train_x[:6000], mnist.train_y[:6000], mnist.test_x[:1000], mnist.test_y[:1000])


@pytest.fixture(scope="session")
def teacher(small):
    """LeNet-5 trained (seeded) for 3 epochs on 6,000 real images."""
    torch.manual_seed(0)
    model = build_model("lenet5")
    train_model(model, small, TrainConfig(epochs=3, lr=3e-3, seed=0, progress=False))
    return model.eval()


@pytest.fixture(scope="session")
def meta(teacher, small):
    return record(teacher, small, progress=False)


def write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> None:
    header = b"\0\0\x08" + bytes([arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory, mnist) -> Path:
    """2,000 training and 500 test images of real MNIST as standard IDX files."""
    d = tmp_path_factory.mktemp("idx")
    write_idx(d / "train-images-idx3-ubyte.gz", mnist.train_x[:2000].numpy(), compress=True)
    write_idx(d / "train-labels-idx1-ubyte", mnist.train_y[:2000].numpy())
    write_idx(d / "t10k-images-idx3-ubyte", mnist.test_x[:500].numpy())
    write_idx(d / "t10k-labels-idx1-ubyte", mnist.test_y[:500].numpy())
    return d
