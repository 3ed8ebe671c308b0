"""The registry, user code specs, and the rule that user code runs only when the user names it."""
import pytest
import torch

from dfkd.checkpoint import load_model, save_model
from dfkd.data import DataInfo
from dfkd.errors import DfkdError
from dfkd.models import MODELS, build_model, count_parameters, is_code_spec
from dfkd.specs import resolve_model
from dfkd.taps import default_layers, tap
from tests.conftest import ROOT

PARAMS = {"hinton-1200": 2_395_210, "hinton-800": 1_276_810, "lenet5": 61_706, "lenet5-half": 35_820}
MNIST = DataInfo((1, 28, 28), 10)
OWN = str(ROOT / "examples" / "own_model.py")


def test_registry_is_covered():
    assert set(PARAMS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count(name):
    assert count_parameters(build_model(name, MNIST)[0]) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(MODELS) + ["own:teacher", "own:student"])
def test_forward_backward_reach_every_parameter(name, small):
    spec = OWN + ":" + name.split(":")[1] if name.startswith("own") else name
    torch.manual_seed(0)
    m, info = build_model(spec, small.info if name.startswith(("lenet", "own")) else MNIST)
    x = small.train[0][:8] if info.shape == (1, 32, 32) else small.train[0][:8, :, 2:30, 2:30]
    out = m(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    with tap(m, default_layers(m)) as acts:
        m.eval()(x)
    assert list(acts) == default_layers(m)


def test_registry_fits_the_data():
    m, info = build_model("lenet5", DataInfo((3, 28, 28), 7))
    assert info.shape == (3, 32, 32) and m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    m, info = build_model("hinton-800", DataInfo((2, 5, 5), 4))
    assert info.shape == (2, 5, 5) and m(torch.zeros(2, 2, 5, 5)).shape == (2, 4)


def test_unknown_model_lists_valid_names():
    with pytest.raises(DfkdError, match="choose one of hinton-1200, hinton-800, lenet5, lenet5-half"):
        build_model("resnet18", MNIST)


def test_code_specs(tmp_path):
    assert is_code_spec("a/b.py:make") and is_code_spec("pkg.mod:make") and not is_code_spec("lenet5")
    model, _ = build_model(OWN + ":teacher", MNIST, width=4)
    assert model.stem[0].out_channels == 4
    bad = tmp_path / "broken.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(DfkdError, match="cannot import the model code.*ModuleNotFoundError"):
        build_model(f"{bad}:make", MNIST)
    (tmp_path / "ok.py").write_text("def make():\n    return 3\n")
    with pytest.raises(DfkdError, match="not a torch.nn.Module"):
        build_model(f"{tmp_path / 'ok.py'}:make", MNIST)
    with pytest.raises(DfkdError, match="defines no callable 'nothing'"):
        build_model(f"{tmp_path / 'ok.py'}:nothing", MNIST)
    with pytest.raises(DfkdError, match="bad arguments for lenet5"):
        build_model("lenet5", MNIST, wings=2)


def test_saved_user_model_needs_its_code_named(tmp_path):
    """A description that names code must not make dfkd import it; naming the code does."""
    torch.manual_seed(0)
    model, info = build_model(OWN + ":student", MNIST, width=4)
    save_model(model, tmp_path / "s", OWN + ":student", {"width": 4}, info)
    with pytest.raises(DfkdError, match="made from user code .*add --code"):
        load_model(tmp_path / "s")
    back, desc, binfo = load_model(tmp_path / "s", code=[OWN])
    assert binfo == info and desc["model"]["args"] == {"width": 4} and len(desc["model"]["code_sha256"]) == 64
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(back(x), model.eval()(x))
    # a spec with foreign weights: a plain state dict read with weights_only
    torch.save(model.state_dict(), tmp_path / "w.pt")
    other, _, _ = resolve_model(OWN + ":student", str(tmp_path / "w.pt"), {"width": 4})
    assert torch.equal(other(x), model(x))
    with pytest.raises(DfkdError, match="weights do not fit the model"):
        resolve_model(OWN + ":student", str(tmp_path / "w.pt"), {"width": 8})
