"""Recording on models a user would bring, per-channel conv statistics against an oracle,
streaming a large data set in bounded memory, and bad input refused."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from dfkd.config import RecordConfig
from dfkd.errors import DfkdError
from dfkd.recording import record
from tests.conftest import ROOT


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class UserNet(nn.Module):
    """A small CNN with BatchNorm and a residual block, as a user's own model would be."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = Residual(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.fixture(scope="module")
def user_data(small):
    return small.train[0][:1500, :, 2:30, 2:30].contiguous(), small.train[1][:1500]


def test_records_all_kinds_on_a_user_cnn(user_data):
    torch.manual_seed(0)
    net = UserNet().eval()
    x, y = user_data
    m = record(net, (x, y), RecordConfig())
    assert [l["path"] for l in m.header["layers"]] == ["stem.0", "block.conv", "head.2", "head.4"]
    assert [l["nodes"] for l in m.header["layers"]] == [8, 8, 16, 10]
    assert [g["name"] for g in m.header["spectral"]["pairs"]] == ["stem.0+block.conv", "block.conv+head.2",
                                                                   "head.2+head.4"]
    assert m.header["data"]["shape"] == [1, 28, 28] and m.header["data"]["num_classes"] == 10
    # conv maps per channel, pooled over positions: an oracle from torch.cov over (samples, positions)
    with torch.no_grad():
        a = net.stem[0](x)
    for c in (0, 7):
        rows = a[y == c].permute(0, 2, 3, 1).reshape(-1, 8).double()
        chol = m.get("all-layers", "chol", "stem.0")[c].double()
        assert torch.allclose(m.get("all-layers", "mean", "stem.0")[c].double(), rows.mean(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(chol @ chol.T, torch.cov(rows.T), rtol=1e-4, atol=1e-6)
    for c in range(10):
        xc = (net.head[4](torch.relu(net.head[2](net.head[1](net.head[0](net.block(net.stem(x[y == c]))))))) / 8).double()
        assert torch.allclose(m.get("top-layer", "mean")[c].double(), xc.mean(0), rtol=1e-5, atol=1e-6)
    unit = record(net, (x, y), RecordConfig(kinds=("all-layers",), conv_stats="unit"))
    assert unit.get("all-layers", "std", "stem.0").shape == (10, 8 * 28 * 28)


def test_chosen_layers_only(teacher, small):
    m = record(teacher, small.train, RecordConfig(kinds=("all-layers",), layers=("fc1", "fc2")))
    assert [l["path"] for l in m.header["layers"]] == ["fc1", "fc2"]
    assert set(m.tensors) == {"count", "all-layers/fc1/mean", "all-layers/fc1/chol", "all-layers/fc2/mean",
                              "all-layers/fc2/chol"}


def test_unknown_layer_lists_nearest(teacher, small):
    with pytest.raises(DfkdError, match="no layer 'fc4' in the model; nearest: fc3, fc2, fc1"):
        record(teacher, small.train, RecordConfig(layers=("fc4",)))


def test_shape_that_does_not_fit(teacher, small):
    x = torch.rand(100, 1, 20, 20)
    with pytest.raises(DfkdError, match="do not fit the model"):
        record(teacher, (x, small.train[1][:100]), RecordConfig())


def test_nan_activations_refused(teacher, small):
    x = small.train[0][:200].clone()
    x[150, 0, 5, 5] = float("nan")
    with pytest.raises(DfkdError, match="NaN or infinite activations"):
        record(teacher, (x, small.train[1][:200]), RecordConfig(batch_size=100))


def test_class_without_examples_refused(teacher, small):
    keep = small.train[1][:2000] != 7
    with pytest.raises(DfkdError, match="class 7 has 0 example"):
        record(teacher, (small.train[0][:2000][keep], small.train[1][:2000][keep]), RecordConfig())


def test_lowrank_and_bad_cov(teacher, small):
    m = record(teacher, small.train, RecordConfig(kinds=("all-layers",), layers=("fc1",), cov="lowrank:4"))
    assert m.get("all-layers", "factor", "fc1").shape == (10, 120, 4)
    with pytest.raises(DfkdError, match="is not auto, full, diag or lowrank"):
        record(teacher, small.train, RecordConfig(kinds=("all-layers",), cov="banded"))
    with pytest.raises(DfkdError, match="unknown kind"):
        record(teacher, small.train, RecordConfig(kinds=("top_layer",)))


STREAM = """
import resource, sys, torch
from torch.utils.data import Dataset
sys.path.insert(0, {root!r})
from dfkd.config import RecordConfig
from dfkd.recording import record
torch.set_num_threads(1)

class Generated(Dataset):
    '''{n} items made on demand: a class-dependent blob plus seeded noise, never held at once.'''
    def __len__(self):
        return {n}
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        y = i % 10
        x = torch.rand(1, 16, 16, generator=g) * 0.2
        x[0, y:y + 4, y:y + 4] += 1.0
        return x, y

net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 10))
meta = record(net, Generated(), RecordConfig(kinds=("top-layer", "all-layers"), batch_size=2000))
print(meta.header["recorded_on"]["n_samples"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow  # 12 s: 50,000 generated images; the streaming code path runs in CI on every record test
def test_a_large_generated_set_streams_in_bounded_memory(tmp_path):
    """200,000 items of 1x16x16 are 205 MB as float32; recording them holds one batch at a time."""
    def run(n):
        r = subprocess.run([sys.executable, "-c", STREAM.format(root=str(ROOT), n=n)], capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr
        count, rss_mb = map(int, r.stdout.split())
        assert count == n
        return rss_mb
    small_rss, big_rss = run(2000), run(200_000)
    assert big_rss < small_rss + 100, (small_rss, big_rss)  # not 205 MB more
