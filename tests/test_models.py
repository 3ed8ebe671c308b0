import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.models import MODELS, build_model, count_parameters
from dfkd.taps import default_layers, tap

PARAMS = {"hinton-1200": 2_395_210, "hinton-800": 1_276_810, "lenet5": 61_706, "lenet5-half": 35_820}


def test_registry_is_covered():
    assert set(PARAMS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count(name):
    assert count_parameters(build_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_reach_every_parameter(name, mnist):
    from dfkd.data import to_input
    torch.manual_seed(0)
    m = build_model(name)
    x = to_input(mnist.train_x[:8], m.input_shape)
    out = m(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    with tap(m, default_layers(m)) as acts:
        m.eval()(x)
    assert list(acts) == default_layers(m) and len(acts) in (3, 5)


def test_unknown_model_lists_valid_names():
    with pytest.raises(DfkdError, match="choose one of hinton-1200, hinton-800, lenet5, lenet5-half"):
        build_model("resnet18")


def test_unknown_tap_path_names_nearest():
    m = build_model("lenet5")
    with pytest.raises(DfkdError, match="nearest: conv1"):
        with tap(m, ["conv_1"]):
            pass
