"""Each objective: small at real data of the target class, large on noise; its input gradient
against autograd on an untouched copy of the teacher; bn-stats and per-channel matching against
independent float64 computations."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dfkd.config import ReconstructConfig, RecordConfig
from dfkd.errors import DfkdError
from dfkd.kinds import REGISTRY
from dfkd.metadata import Metadata
from dfkd.objectives import AllLayersDropout, OBJECTIVES, make_objective
from dfkd.reconstruction import optimise_batch
from dfkd.stats import unit_match
from dfkd.recording import record
from dfkd.taps import input_key, tap
from tests.conftest import ROOT

# on LeNet-5, which has no LayerNorm / GroupNorm and no token layer: norm-stats and token-positions are tested on
# such teachers in test_beyond_bn.py and test_tokens.py
ELSEWHERE = ("norm-stats", "token-positions")
STAT_OBJECTIVES = [n for n, c in OBJECTIVES.items() if c.kind not in (None, *ELSEWHERE)]
CFG = ReconstructConfig()


@pytest.fixture(scope="module")
def every(teacher, small, meta):
    """The session's statistics (the default kinds) plus the registry's other kinds, recorded as it is."""
    extra = tuple(k for k in REGISTRY if k not in meta.kinds and k not in ELSEWHERE)
    more = record(teacher, small.train, RecordConfig(kinds=extra, conv_stats="unit"), small.info)
    return Metadata(dict(meta.header, kinds=meta.kinds + list(extra)), {**meta.tensors, **more.tensors})


def _loss(obj, teacher, x, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    tg = obj.targets(labels, g)
    with torch.no_grad(), tap(teacher, obj.layers(), inputs=obj.inputs()) as acts:
        logits = teacher(x)
        return obj.loss(logits, acts, tg, labels).item() / len(labels)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("name", STAT_OBJECTIVES)
def test_loss_small_on_real_data_large_on_noise(name, whiten, teacher, every, small):
    obj = make_objective(name, every, teacher, ReconstructConfig(whiten=whiten))
    x, labels = small.test[0][:400], small.test[1][:400]
    real = _loss(obj, teacher, x, labels)
    noise = _loss(obj, teacher, 0.15 + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), labels)
    shuffled = _loss(obj, teacher, x, labels.roll(1))  # real images, wrong classes' targets
    assert real < 0.5 * noise, (real, noise)
    assert real < shuffled, (real, shuffled)


@pytest.mark.parametrize("name", STAT_OBJECTIVES)
def test_first_step_follows_the_input_gradient_and_leaves_the_teacher(name, teacher, every, small):
    """Adam's first step is ``lr * g / (|g| + eps)``: the gradient ``g`` from autograd on an
    independent, trainable copy of the teacher predicts the step optimise_batch takes."""
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    cfg = ReconstructConfig(objective=name, steps=1, clamp=False)
    obj = make_objective(name, every, frozen, cfg)
    labels = torch.arange(20) % 10
    x1, _ = optimise_batch(frozen, obj, labels, cfg, torch.Generator().manual_seed(0), small.info)
    g = torch.Generator().manual_seed(0)
    x0 = cfg.init_mean + cfg.init_std * torch.randn((20, *small.info.shape), generator=g)
    tg = obj.targets(labels, g)
    masks = obj.masks(small.info.shape, 20, g) if isinstance(obj, AllLayersDropout) else {}
    live = copy.deepcopy(teacher).requires_grad_(True)
    alter = (lambda p, o: o * masks[p] if p in masks else o) if masks else None
    x = x0.clone().requires_grad_(True)
    with tap(live, obj.layers(), alter=alter) as acts:
        loss = obj.loss(live(x * masks["input"] if masks else x), acts, tg, labels)
    grad, = torch.autograd.grad(loss, x)
    expected = x0 - cfg.lr * grad / (grad.abs() + 1e-8)
    assert torch.allclose(x1, expected, atol=1e-4), (x1 - expected).abs().max()
    assert not torch.allclose(x1, x0)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dropout_masks_are_fixed_and_at_the_stated_rates(teacher, meta):
    obj = make_objective("all-layers-dropout", meta, teacher)
    m1 = obj.masks((1, 32, 32), 500, torch.Generator().manual_seed(0))
    m2 = obj.masks((1, 32, 32), 500, torch.Generator().manual_seed(0))
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert abs((m1["input"] > 0).float().mean().item() - 0.8) < 0.01
    assert abs((m1["fc1"] > 0).float().mean().item() - 0.5) < 0.02
    assert "fc3" not in m1  # the output layer is never dropped


def test_unknown_objective_and_missing_kind(teacher, small):
    with pytest.raises(DfkdError, match="choose one of top-layer"):
        make_objective("deepinversion", None, teacher)
    m = record(teacher, small.train, RecordConfig(kinds=("top-layer",)))
    with pytest.raises(DfkdError, match="dfkd record --teacher .* --kinds spectral-all"):
        make_objective("spectral-all", m, teacher)
    with pytest.raises(DfkdError, match="bn-stats needs BatchNorm layers"):
        make_objective("bn-stats", None, teacher)


@pytest.mark.parametrize("name", ["all-layers", "spectral-pairs"])
def test_whitened_loss_is_the_standardised_distance(name, teacher, meta, small):
    """Against an independent float64 computation from the file's tensors."""
    obj = make_objective(name, meta, teacher)
    x, labels = small.test[0][:50], small.test[1][:50]
    tg = obj.targets(labels, torch.Generator().manual_seed(0))
    with torch.no_grad(), tap(teacher, obj.layers()) as acts:
        got = obj.loss(teacher(x), acts, tg, labels).double()
    t = {k: v.double() for k, v in meta.tensors.items()}
    oracle = torch.zeros(50, dtype=torch.float64)
    if name == "all-layers":
        for i in obj.infos:
            pre = f"all-layers/{i.path}/"
            std = t[pre + "std"] if pre + "std" in t else \
                torch.stack([c.matmul(c.T).diagonal() for c in t[pre + "chol"]]).sqrt()
            sd = std.mean(0)
            z = (acts[i.path].flatten(1).double() - tg[i.path].double()) / (sd + 1e-3 * sd.mean())
            oracle += (z ** 2).mean(1)
    else:
        for g in meta.header["spectral"]["pairs"]:
            pre = "spectral-pairs/" + g["name"]
            s = torch.cat([acts[p].double().flatten(2).mean(2) if acts[p].dim() == 4 else acts[p].double()
                           for p in g["layers"]], 1)
            sd = t[pre + "/std"].mean(0)
            z = (s @ t[pre + "/basis"] - tg[pre].double()) / (sd + 1e-3 * sd.mean())
            oracle += (z ** 2).mean(1)
    assert torch.allclose(got, oracle.sum(), rtol=1e-4), (got, oracle.sum())
    plain = make_objective(name, meta, teacher, ReconstructConfig(whiten=False))
    with torch.no_grad(), tap(teacher, plain.layers()) as acts:
        assert not torch.allclose(plain.loss(teacher(x), acts, tg, labels).double(), oracle.sum(), rtol=1e-2)


def test_per_channel_loss_matches_the_class_moments(teacher, small):
    """A conv layer recorded per channel: the loss compares each class's pooled channel mean and
    covariance in the batch with the stored ones (float64 oracle, loop over classes)."""
    m = record(teacher, small.train, RecordConfig(kinds=("all-layers",), layers=("conv2",)))
    obj = make_objective("all-layers", m, teacher, ReconstructConfig(whiten=False))
    x, labels = small.test[0][:60], small.test[1][:60]
    with torch.no_grad(), tap(teacher, ["conv2"]) as acts:
        got = obj.loss(teacher(x), acts, {}, labels).double()
    a = acts["conv2"].double()
    oracle = 0.0
    for c in labels.unique():
        rows = a[labels == c].permute(0, 2, 3, 1).reshape(-1, 16)
        chol = m.get("all-layers", "chol", "conv2")[c].double()
        dm = (rows.mean(0) - m.get("all-layers", "mean", "conv2")[c].double()).pow(2).mean()
        dc = (torch.cov(rows.T, correction=0) - chol @ chol.T).pow(2).mean()
        oracle += (labels == c).sum().item() * (dm + dc)
    assert torch.allclose(got, torch.as_tensor(oracle), rtol=1e-3), (got, oracle)
    # at the training data itself the loss is far smaller than on noise
    noise = torch.rand(60, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tap(teacher, ["conv2"]) as acts:
        assert obj.loss(teacher(noise), acts, {}, labels) > 5 * got


@pytest.mark.parametrize("whiten", [True, False])
def test_unit_targets_batch_matches_each_class_mean_and_spread(teacher, small, whiten):
    """unit_targets batch: a per-unit record (conv1 per unit, a diagonal Gaussian; fc1, a full one) is matched,
    per class in the batch, on its mean and per-unit standard deviation (float64 oracle, loop over classes; a class
    seen once, on its mean alone), and draws nothing. Unlike the paper's draws, it tells a varied batch from one real
    image repeated per class."""
    m = record(teacher, small.train, RecordConfig(kinds=("all-layers",), layers=("conv1", "fc1"), conv_stats="unit"))
    obj = make_objective("all-layers", m, teacher, ReconstructConfig(unit_targets="batch", whiten=whiten))
    draw = make_objective("all-layers", m, teacher, ReconstructConfig(whiten=whiten))
    xs, ys = small.test[0][:400], small.test[1][:400]
    keep = torch.cat([(ys != 9).nonzero()[:199, 0], (ys == 9).nonzero()[:1, 0]])  # class 9 once: no spread
    x, labels = xs[keep], ys[keep]
    assert obj.targets(labels, torch.Generator().manual_seed(0)) == {}
    with torch.no_grad(), tap(teacher, ["conv1", "fc1"]) as acts:
        got = obj.loss(teacher(x), acts, {}, labels).double()
    oracle = 0.0
    for path in ("conv1", "fc1"):
        t = {k: v.double() for k, v in m.tensors.items() if k.startswith(f"all-layers/{path}/")}
        pre = f"all-layers/{path}/"
        var = t[pre + "std"] ** 2 if pre + "std" in t else torch.stack([c @ c.T for c in t[pre + "chol"]]).diagonal(dim1=1, dim2=2)
        sd = var.sqrt().mean(0)
        w = 1 / (sd + 1e-3 * sd.mean()) if whiten else torch.ones_like(sd)
        a = acts[path].double().flatten(1)
        for c in labels.unique():
            rows = a[labels == c]
            dm = ((rows.mean(0) - t[pre + "mean"][c]) * w).pow(2).mean()
            dv = ((rows.std(0) - var[c].sqrt()) * w).pow(2).mean() if len(rows) > 1 else 0.0
            oracle += len(rows) * (dm + dv)
    assert torch.allclose(got, torch.as_tensor(oracle), rtol=1e-4), (got, oracle)
    # one real image per class, repeated: no variation within a class
    first = torch.stack([(labels == c).nonzero()[0, 0] for c in labels])
    same = x[first]
    assert _loss(obj, teacher, same, labels) > 2 * _loss(obj, teacher, x, labels)
    assert _loss(draw, teacher, same, labels) < 1.5 * _loss(draw, teacher, x, labels)
    with pytest.raises(DfkdError, match="'pairs' is not draw or batch"):
        make_objective("all-layers", m, teacher, ReconstructConfig(unit_targets="pairs"))


def test_unit_match_gradient_is_the_finite_differences_one():
    """What reconstruction descends: unit_match's gradient with respect to the inputs' rows (float64) against
    central finite differences (``torch.autograd.gradcheck``), on a batch with a class seen once (its mean alone
    counts) and a class absent (nothing); and its value against a loop over the classes present."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 2, 0, 2, 2, 3, 0])  # class 1 absent, class 3 once
    rows = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mean, std = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.rand(4, 5, generator=g, dtype=torch.float64) + 0.5
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(lambda r: unit_match(r, labels, mean, std, w), (rows,))
    oracle = sum(len(r) * (((r.mean(0) - mean[c]) * w).pow(2).mean() +
                           (((r.std(0) - std[c]) * w).pow(2).mean() if len(r) > 1 else 0))
                 for c in (0, 2, 3) for r in [rows.detach()[labels == c]])
    assert torch.allclose(unit_match(rows.detach(), labels, mean, std, w), oracle, rtol=1e-12)


def test_bn_stats_is_deepinversion_loss(small):
    """The feature-distribution loss against an independent float64 computation, and the
    combination with a metadata objective is the sum of its parts."""
    from dfkd.models import build_model
    torch.manual_seed(0)
    net, info = build_model(str(ROOT / "examples" / "own_model.py") + ":teacher", small.info, width=4)
    net.train()
    with torch.no_grad():
        net(small.train[0][:500])  # running statistics from real data
    net.eval()
    cfg = ReconstructConfig(bn_weight=0.5)
    obj = make_objective("bn-stats", None, net, cfg)
    x, labels = torch.rand(16, 1, 32, 32), torch.arange(16) % 10
    with torch.no_grad(), tap(net, [], inputs=obj.inputs()) as acts:
        logits = net(x)
        got = obj.loss(logits, acts, {}, labels).double()
    oracle = 0.0
    for p, m in net.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            z = acts[input_key(p)].double()
            oracle += (z.mean((0, 2, 3)) - m.running_mean.double()).norm() + \
                (z.var((0, 2, 3), unbiased=False) - m.running_var.double()).norm()
    oracle = 16 * 0.5 * oracle + F.cross_entropy(logits.double(), labels, reduction="sum")
    assert len(obj.inputs()) == 6 and torch.allclose(got, oracle, rtol=1e-4)
    meta = record(net, (small.train[0][:1000], small.train[1][:1000]), RecordConfig(kinds=("all-layers",)), info)
    both = make_objective("all-layers+bn-stats", meta, net, cfg)
    al = make_objective("all-layers", meta, net, cfg)
    tg = both.targets(labels, torch.Generator().manual_seed(0))
    with torch.no_grad(), tap(net, both.layers(), inputs=both.inputs()) as acts:
        logits = net(x)
        total = both.loss(logits, acts, tg, labels)
        parts = al.loss(logits, acts, al.targets(labels, torch.Generator().manual_seed(0)), labels) + \
            obj.loss(logits, acts, {}, labels)
    assert torch.allclose(total, parts, rtol=1e-5)


def test_defaults_spell_kinds_as_objectives(teacher, meta):
    """The config defaults name things that exist: the default objective builds on a full record."""
    from dfkd.metadata import KINDS
    assert RecordConfig().kinds is None and set(KINDS) <= set(OBJECTIVES)  # None: the default kinds
    assert all(OBJECTIVES[k].kind == k for k in KINDS)
    assert make_objective(ReconstructConfig().objective, meta, teacher).name == "spectral-pairs"
