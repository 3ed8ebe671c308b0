"""What a statistics file reveals: the closed-form class means of ``dfkd.leakage`` against the
true class means computed independently (float64, straight from the data), on dfkd's MLP and
LeNet-5 with MNIST and on a user's BatchNorm/residual CNN with 3-channel images from a folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dfkd.config import RecordConfig
from dfkd.inversion import invert
from dfkd.leakage import class_means, recovery
from dfkd.models import build_model
from dfkd.recording import record
from dfkd.sources import open_data
from tests.conftest import OWN


def true_means(x: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return np.stack([x[y == k].mean(0) for k in range(c)])


@pytest.fixture(scope="module")
def mnist_subset(mnist):
    """6,000 real MNIST training images (raw values in [0, 1]) and their labels."""
    x, y = mnist.train.batch(torch.arange(6000))
    return x, y


def test_first_linear_layer_gives_exact_class_means(mnist_subset):
    torch.manual_seed(0)
    model, info = build_model("hinton-800", open_data("mnist").info)  # 784-800-800-10
    x, y = mnist_subset
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers",)), info)
    inv = invert(model, meta)
    assert [i.layer for i in inv] == ["fc1"]  # fc2 and fc3 lie behind a ReLU: not affine in the input
    assert inv[0].rank == 784 == inv[0].input_dim
    truth = true_means(x.numpy(), y.numpy(), 10)
    got = inv[0].means.flatten(1).double().numpy()
    assert np.abs(got - truth).max() < 2e-3  # float32 statistics, float64 inversion
    assert recovery(inv[0].means, torch.from_numpy(truth).float())["r2"] > 0.999
    assert meta.header["closed_form"][0]["class_means"] == "exact"


def test_per_channel_conv_record_gives_only_a_projection(mnist_subset, small):
    x, y = mnist_subset
    torch.manual_seed(0)
    model, info = build_model("lenet5", open_data("mnist").info)
    data = open_data("mnist", info=info)
    xs, ys = data.train.batch(torch.arange(6000))
    unit = record(model, (xs, ys), RecordConfig(kinds=("all-layers",), layers=["conv1"], conv_stats="unit"), info)
    channel = record(model, (xs, ys), RecordConfig(kinds=("all-layers",), layers=["conv1"]), info)
    truth = torch.from_numpy(true_means(xs.numpy(), ys.numpy(), 10)).float()
    (iu,), (ic,) = invert(model, unit), invert(model, channel)
    assert iu.rank == 1024 and recovery(iu.means, truth)["r2"] > 0.999  # 6x28x28 units: exact
    assert ic.rank == 6 and recovery(ic.means, truth)["r2"] < 0.5      # 6 numbers a class: a projection
    assert channel.header["closed_form"][0]["class_means"] == "projection of rank 6"


class TwiceCalled(torch.nn.Module):
    """One Linear layer applied twice, a ReLU between: its record (the last call, as the tap keeps
    it) lies behind the ReLU, while its first call alone is affine in the input."""
    def __init__(self):
        super().__init__()
        self.lin, self.head = torch.nn.Linear(784, 784), torch.nn.Linear(784, 10)

    def forward(self, x):
        return self.head(self.lin(torch.relu(self.lin(x.flatten(1)))))


def test_a_layer_called_twice_is_judged_by_its_recorded_call(mnist_subset):
    """Stopping the forward at the layer's first call would judge the wrong call affine and claim
    exact class means the file does not give."""
    x, y = mnist_subset
    info = open_data("mnist").info
    torch.manual_seed(0)
    model = TwiceCalled()
    meta = record(model, (x[:500], y[:500]),
                  RecordConfig(kinds=("all-layers",), layers=["lin"]), info)
    assert invert(model, meta) == [] and meta.header["closed_form"] == []


def test_own_bn_residual_model_on_colour_folder(colour_dir):
    """A model dfkd did not define, 3-channel images read from a folder: its first conv's per-unit
    record gives the class means exactly; the true means are read with Pillow here, independently."""
    from PIL import Image
    data = open_data(f"folder:{colour_dir}", normalize="auto")
    torch.manual_seed(0)
    model, info = build_model(f"{OWN}:teacher", data.info, in_channels=3, width=4)
    meta = record(model.eval(), data, RecordConfig(kinds=("all-layers",), layers=["stem.0", "head.2"],
                                                   conv_stats="unit"))
    inv = invert(model, meta)
    assert [i.layer for i in inv] == ["stem.0"] and inv[0].rank == 3 * 32 * 32
    files = sorted((colour_dir / "train").glob("*/*.png"))
    classes = sorted(p.name for p in (colour_dir / "train").iterdir())
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255 for f in files])
    y = np.array([classes.index(f.parent.name) for f in files])
    truth = true_means(x, y, 10)
    assert np.abs(inv[0].means.flatten(1).double().numpy() - truth).max() < 5e-3
    assert np.abs(class_means(data.train, meta.data, 10).flatten(1).double().numpy() - truth).max() < 1e-5


def test_cli_leakage_report(world, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dfkd", "leakage", "--teacher", str(world.teacher), "--synthetic",
                        str(world.synthetic), "--out", str(tmp_path / "rep")], capture_output=True, text=True,
                       env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    # the world's statistics are per channel (dfkd's default): conv1 gives a rank-6 projection only
    assert [(i["layer"], i["rank"], i["exact"]) for i in rep["inversions"]] == [("conv1", 6, False)]
    assert set(rep["synthetic"]) == {"spectral-pairs"} and 0.5 < rep["synthetic"]["spectral-pairs"]["nearest"]["ratio"] < 2
    assert (tmp_path / "rep.png").is_file() and "conv1 (per channel" in r.stdout


def test_a_repeated_solve_is_answered_from_its_inputs_bytes_without_a_second_svd(monkeypatch):
    """``inversion._solve`` keeps its last answers by a sha256 of both operands: the same operands give the
    same rank and solution with one SVD; operands differing in one value are solved afresh."""
    import dfkd.inversion as inv
    calls = []
    real = torch.linalg.lstsq
    monkeypatch.setattr(torch.linalg, "lstsq", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(inv, "_SOLVED", {})
    g = torch.Generator().manual_seed(0)
    jac, rhs = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    first = inv._solve(jac, rhs)
    again = inv._solve(jac.clone(), rhs.clone())
    assert len(calls) == 1 and first[0] == again[0] == 8 and torch.equal(first[1], again[1])
    want = torch.linalg.pinv(jac) @ rhs  # an independent min-norm least-squares solution
    assert torch.allclose(again[1], want, atol=1e-12)
    again[1].zero_()  # the caller's copy: the kept answer is untouched
    assert torch.equal(inv._solve(jac, rhs)[1], first[1])
    other = jac.clone()
    other[3, 2] += 1e-9
    inv._solve(other, rhs)
    assert len(calls) == 2  # one fresh solve for the changed operand
