"""Recording on models a user would bring, and bad input refused."""
import pytest
import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.record import record


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
        self.input_shape = (1, 28, 28)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.fixture(scope="module")
def user_data(small):
    return small.train_x[:1500], small.train_y[:1500]


def test_records_all_kinds_on_a_user_cnn(user_data):
    from dfkd.data import to_input
    torch.manual_seed(0)
    net = UserNet().eval()
    x, y = to_input(user_data[0], (1, 28, 28)), user_data[1]
    m = record(net, (x, y), progress=False)
    paths = [l["path"] for l in m.header["layers"]]
    assert paths == ["stem.0", "block.conv", "head.2", "head.4"]
    nodes = [l["nodes"] for l in m.header["layers"]]
    assert nodes == [8, 8, 16, 10]
    pairs = [g["name"] for g in m.header["spectral"]["pairs"]]
    assert pairs == ["stem.0+block.conv", "block.conv+head.2", "head.2+head.4"]
    # the block's conv and head.2 connect through a flatten of 8 channels x 4 positions
    assert m.tensors["all_layers/stem.0/std"].shape == (10, 8 * 28 * 28)
    for c in range(10):
        xc = (net.head[4](torch.relu(net.head[2](net.head[1](net.head[0](net.block(net.stem(x[y == c]))))))) / 8).double()
        assert torch.allclose(m.tensors["top_layer/mean"][c].double(), xc.mean(0), rtol=1e-5, atol=1e-6)


def test_chosen_layers_only(teacher, small):
    m = record(teacher, small, kinds=["all_layers"], layers=["fc1", "fc2"], progress=False)
    assert [l["path"] for l in m.header["layers"]] == ["fc1", "fc2"]
    assert set(m.tensors) == {"count", "all_layers/fc1/mean", "all_layers/fc1/chol", "all_layers/fc2/mean",
                              "all_layers/fc2/chol"}


def test_unknown_layer_lists_nearest(teacher, small):
    with pytest.raises(DfkdError, match="no layer 'fc4' in the model; nearest: fc3, fc2, fc1"):
        record(teacher, small, layers=["fc4"], progress=False)


def test_shape_that_does_not_fit(teacher, small):
    x = torch.rand(100, 1, 20, 20)
    with pytest.raises(DfkdError, match="do not fit the model"):
        record(teacher, (x, small.train_y[:100]), progress=False)


def test_nan_activations_refused(teacher, small):
    from dfkd.data import to_input
    x = to_input(small.train_x[:200], (1, 32, 32))
    x[150, 0, 5, 5] = float("nan")
    with pytest.raises(DfkdError, match="NaN or infinite activations"):
        record(teacher, (x, small.train_y[:200]), batch_size=100, progress=False)


def test_class_without_examples_refused(teacher, small):
    keep = small.train_y[:2000] != 7
    from dfkd.data import to_input
    x = to_input(small.train_x[:2000][keep], (1, 32, 32))
    with pytest.raises(DfkdError, match="class 7 has 0 example"):
        record(teacher, (x, small.train_y[:2000][keep]), progress=False)


def test_lowrank_and_bad_cov(teacher, small):
    m = record(teacher, small, kinds=["all_layers"], layers=["fc1"], cov="lowrank:4", progress=False)
    assert m.tensors["all_layers/fc1/factor"].shape == (10, 120, 4)
    with pytest.raises(DfkdError, match="--cov"):
        record(teacher, small, kinds=["all_layers"], cov="banded", progress=False)
