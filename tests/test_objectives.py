"""Each objective: small at real data of the target class, large on noise; gradients reach only the inputs."""
import pytest
import torch

from dfkd.config import ReconstructConfig
from dfkd.data import to_input
from dfkd.objectives import OBJECTIVES, AllLayersDropout, make_objective
from dfkd.reconstruct import optimise_batch
from dfkd.taps import tap

STAT_OBJECTIVES = [n for n, c in OBJECTIVES.items() if c.kind is not None]


def _loss(obj, teacher, x, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    tg = obj.targets(labels, g)
    with torch.no_grad(), tap(teacher, obj.layers()) as acts:
        logits = teacher(x)
        return obj.loss(logits, acts, tg).mean().item()


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("name", STAT_OBJECTIVES)
def test_loss_small_on_real_data_large_on_noise(name, whiten, teacher, meta, small):
    obj = make_objective(name, meta, teacher, whiten=whiten)
    x = to_input(small.test_x[:400], (1, 32, 32))
    labels = small.test_y[:400]
    real = _loss(obj, teacher, x, labels)
    noise = _loss(obj, teacher, 0.15 + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), labels)
    shuffled = _loss(obj, teacher, x, labels.roll(1))  # real images, wrong classes' targets
    assert real < 0.5 * noise, (real, noise)
    assert real < shuffled, (real, shuffled)


@pytest.mark.parametrize("name", STAT_OBJECTIVES)
def test_gradients_reach_only_the_inputs(name, teacher, meta):
    obj = make_objective(name, meta, teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = ReconstructConfig(objective=name, steps=6, batch_size=20, progress=False)
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    labels = torch.arange(20) % 10
    x, losses = optimise_batch(teacher, obj, labels, cfg, torch.Generator().manual_seed(0))
    assert x.shape == (20, 1, 32, 32) and not x.requires_grad
    assert losses[-1] < losses[0]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_dropout_masks_are_fixed_and_at_the_stated_rates(teacher, meta):
    obj = make_objective("all-layers-dropout", meta, teacher)
    assert isinstance(obj, AllLayersDropout)
    m1 = obj.masks((1, 32, 32), 500, torch.Generator().manual_seed(0))
    m2 = obj.masks((1, 32, 32), 500, torch.Generator().manual_seed(0))
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert abs((m1["input"] > 0).float().mean().item() - 0.8) < 0.01
    assert abs((m1["fc1"] > 0).float().mean().item() - 0.5) < 0.02
    assert "fc3" not in m1  # the output layer is never dropped


def test_unknown_objective_and_missing_kind(teacher, small):
    from dfkd.errors import DfkdError
    from dfkd.record import record
    with pytest.raises(DfkdError, match="choose one of top-layer"):
        make_objective("deepinversion", None, teacher)
    m = record(teacher, small, kinds=["top_layer"], progress=False)
    with pytest.raises(DfkdError, match="dfkd record --teacher .* --kinds spectral_all"):
        make_objective("spectral-all", m, teacher)


@pytest.mark.parametrize("name", ["all-layers", "spectral-pairs"])
def test_whitened_loss_is_the_standardised_distance(name, teacher, meta, small):
    """Against an independent float64 computation from the file's tensors."""
    obj = make_objective(name, meta, teacher, whiten=True)
    x, labels = to_input(small.test_x[:50], (1, 32, 32)), small.test_y[:50]
    tg = obj.targets(labels, torch.Generator().manual_seed(0))
    with torch.no_grad(), tap(teacher, obj.layers()) as acts:
        got = obj.loss(teacher(x), acts, tg).double()
    t = {k: v.double() for k, v in meta.tensors.items()}
    oracle = torch.zeros(50, dtype=torch.float64)
    if name == "all-layers":
        for i in obj.infos:
            pre = f"all_layers/{i.path}/"
            std = t[pre + "std"] if pre + "std" in t else \
                torch.stack([c.matmul(c.T).diagonal() for c in t[pre + "chol"]]).sqrt()
            sd = std.mean(0)
            z = (acts[i.path].flatten(1).double() - tg[i.path].double()) / (sd + 1e-3 * sd.mean())
            oracle += (z ** 2).mean(1)
    else:
        for g in meta.header["spectral"]["pairs"]:
            pre = "spectral_pairs/" + g["name"]
            s = torch.cat([acts[p].double().flatten(2).mean(2) if acts[p].dim() == 4 else acts[p].double()
                           for p in g["layers"]], 1)
            sd = t[pre + "/std"].mean(0)
            z = (s @ t[pre + "/basis"] - tg[pre].double()) / (sd + 1e-3 * sd.mean())
            oracle += (z ** 2).mean(1)
    assert torch.allclose(got, oracle, rtol=1e-4), (got[:3], oracle[:3])
    plain = make_objective(name, meta, teacher, whiten=False)
    with torch.no_grad(), tap(teacher, plain.layers()) as acts:
        assert not torch.allclose(plain.loss(teacher(x), acts, tg).double(), oracle, rtol=1e-2)
