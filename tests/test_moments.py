"""The fused losses (``dfkd.moments``) against the plain tensor expressions they replace, in float64: values,
gradients (``torch.autograd.gradcheck``: central finite differences) and the batch layouts that take the
fused path against those that do not."""
import pytest
import torch

from dfkd.moments import cycle, moments, sq_distance, unfused
from dfkd.stats import class_match, unit_match


def _g():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dims,correction", [((0, 2, 3), 0), ((0,), 1), ((0, 3), 0), ((1,), 1), ((-1, 0), 0)])
def test_moments_are_var_mean_with_its_gradient(dims, correction):
    x = torch.randn(6, 3, 4, 5, generator=_g(), dtype=torch.float64, requires_grad=True)
    m, v = moments(x, dims, correction)
    v2, m2 = torch.var_mean(x, dims, correction=correction)
    assert torch.allclose(m, m2, rtol=1e-12) and torch.allclose(v, v2, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x: moments(x, dims, correction), (x,))
    # one output used, the other's gradient None; and a non-contiguous input
    assert torch.autograd.gradcheck(lambda x: moments(x, dims, correction)[1].pow(2).sum(), (x,))
    assert torch.autograd.gradcheck(lambda x: moments(x, dims, correction)[0].exp().sum(), (x,))
    assert torch.autograd.gradcheck(lambda x: moments(x.transpose(1, 3), dims, correction), (x,))


def test_moments_gradient_is_the_plain_expressions():
    x = torch.randn(50, 8, 6, generator=_g(), dtype=torch.float64, requires_grad=True)
    gm, gv = torch.randn(8, generator=_g(), dtype=torch.float64), torch.rand(8, generator=_g(), dtype=torch.float64)
    m, v = moments(x, (0, 2))
    (fused,) = torch.autograd.grad((m * gm).sum() + (v * gv).sum(), x)
    plain = (x.mean((0, 2)) * gm).sum() + (x.var((0, 2), unbiased=False) * gv).sum()
    (oracle,) = torch.autograd.grad(plain, x)
    assert torch.allclose(fused, oracle, rtol=1e-10, atol=1e-14)
    # a constant input takes the plain expressions (nothing to differentiate)
    assert torch.equal(moments(x.detach(), (0, 2))[1], x.detach().var((0, 2), unbiased=False))


def test_sq_distance_is_the_weighted_mean_square():
    g = _g()
    x = torch.randn(7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t, w = torch.randn(7, 9, generator=g, dtype=torch.float64), torch.rand(9, generator=g, dtype=torch.float64)
    plain = ((x - t) * w).pow(2).mean(1).sum()
    assert torch.allclose(sq_distance(x, t, w), plain, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x: sq_distance(x, t, w), (x,))
    # a target that needs a gradient takes the plain expression, and gets its gradient
    tt = t.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, tt: sq_distance(x, tt, w), (x, tt))


def test_cycle_finds_reconstructions_label_layout_only():
    assert cycle((torch.arange(500) + 3) % 10) == 10          # reconstruction's shard 0 offset by 3
    assert cycle(torch.tensor([2, 0, 2, 0, 2, 0])) == 2       # two classes of ten present
    assert cycle(torch.tensor([1, 1, 1])) == 1
    assert cycle(torch.arange(10)) == 0                       # each class once: no spread to take
    assert cycle(torch.tensor([0, 1, 0, 1, 1, 0])) == 0       # not one period repeated
    assert cycle(torch.tensor([0, 1, 2, 0, 1])) == 0          # a broken last period
    assert cycle(torch.tensor([], dtype=torch.long)) == 0
    # asked again with the same tensor (a batch's steps), and after it changed in place
    labels = torch.arange(6) % 3
    assert cycle(labels) == 3 and cycle(labels) == 3
    labels[0] = 1
    assert cycle(labels) == 0


def _permuted(labels, g):
    """The same batch in another order: one that no period describes."""
    perm = torch.randperm(len(labels), generator=g)
    assert cycle(labels) and not cycle(labels[perm])
    return perm


def test_unit_match_on_a_cycle_is_the_per_class_loss():
    """The fused path (labels one period repeated) against the one-hot path on the same rows shuffled, and both
    against a loop over the classes; the gradients agree row for row."""
    g = _g()
    labels = (torch.arange(12) + 1) % 4
    rows = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mean, std = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.rand(6, 5, generator=g, dtype=torch.float64) + 0.5
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    perm = _permuted(labels, g)
    fused, plain = unit_match(rows, labels, mean, std, w), unit_match(rows[perm], labels[perm], mean, std, w)
    oracle = sum(len(r) * (((r.mean(0) - mean[c]) * w).pow(2).mean() + ((r.std(0) - std[c]) * w).pow(2).mean())
                 for c in range(4) for r in [rows.detach()[labels == c]])
    assert torch.allclose(fused, oracle, rtol=1e-12) and torch.allclose(plain, oracle, rtol=1e-12)
    (gf,) = torch.autograd.grad(fused, rows)
    (gp,) = torch.autograd.grad(plain, rows)
    assert torch.allclose(gf, gp, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda r: unit_match(r, labels, mean, std, w), (rows,))


def test_class_match_on_a_cycle_is_the_per_class_loss():
    """The pooled diagonal match, fused against the one-hot path on the shuffled batch, value and gradient."""
    g = _g()
    labels = torch.tensor([3, 0, 3, 0, 3, 0])
    out = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.rand(5, 4, generator=g, dtype=torch.float64)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
    perm = _permuted(labels, g)
    fused, plain = class_match(out, labels, mean, var, w), class_match(out[perm], labels[perm], mean, var, w)
    assert torch.allclose(fused, plain, rtol=1e-12)
    (gf,) = torch.autograd.grad(fused, out)
    (gp,) = torch.autograd.grad(plain, out)
    assert torch.allclose(gf, gp, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda o: class_match(o, labels, mean, var, w), (out,))


def test_unfused_takes_the_plain_expressions():
    """What the benchmark's "plain losses" row runs: autograd's own graph, and no period found."""
    x = torch.randn(6, 4, generator=_g(), requires_grad=True)
    labels = torch.arange(6) % 3
    assert "Moments" in type(moments(x, (0,))[0].grad_fn).__name__ and cycle(labels) == 3
    assert "SqDistance" in type(sq_distance(x, x.detach() + 1, torch.ones(4)).grad_fn).__name__
    with unfused():
        assert "Moments" not in type(moments(x, (0,))[0].grad_fn).__name__ and cycle(labels) == 0
        assert "SqDistance" not in type(sq_distance(x, x.detach() + 1, torch.ones(4)).grad_fn).__name__
    assert cycle(labels) == 3


def _graph_has(loss: torch.Tensor, name: str) -> bool:
    seen, todo = set(), [loss.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if name in type(f).__name__:
            return True
        todo += [g for g, _ in f.next_functions]
    return False


def test_the_matches_take_the_fused_path_on_a_cycle_only():
    g = _g()
    rows = torch.randn(12, 5, generator=g, requires_grad=True)
    labels, mean, std, w = (torch.arange(12) + 1) % 4, torch.zeros(6, 5), torch.ones(6, 5), torch.ones(5)
    assert _graph_has(unit_match(rows, labels, mean, std, w), "_Moments")
    grouped = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3])  # the same classes, not one period repeated
    assert not _graph_has(unit_match(rows, grouped, mean, std, w), "_Moments")
    out = torch.randn(6, 4, 3, 3, generator=g, requires_grad=True)
    assert _graph_has(class_match(out, torch.tensor([3, 0] * 3), torch.zeros(5, 4), torch.ones(5, 4), torch.ones(4)),
                      "_Moments")


def test_float32_moments_far_from_zero_mean_stay_exact():
    """A unit whose mean is 1,000 times its spread (a unit that barely varies): the float32 variance and its
    gradient against float64's, where ``E[x^2] - m^2`` would lose every digit."""
    x64 = 10 + 0.01 * torch.randn(50, 10, 8, generator=_g(), dtype=torch.float64)
    x = x64.float().requires_grad_(True)
    m, v = moments(x, (0,), 1)
    oracle = x64.float().double().var(0)
    assert ((v.double() - oracle) / oracle).abs().max() < 1e-4
    gv = torch.rand(10, 8, generator=_g(), dtype=torch.float64)
    (got,) = torch.autograd.grad((v * gv.float()).sum(), x)
    x2 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad((x2.var(0) * gv).sum(), x2)
    assert ((got.double() - want).norm() / want.norm()) < 1e-4
    # unit_match on such rows: the fused value against float64's
    labels = torch.arange(50 * 10) % 10
    rows = x.detach().reshape(500, 8)
    mean, std, w = torch.full((10, 8), 10.0), torch.full((10, 8), 0.01), torch.full((8,), 100.0)
    f32 = unit_match(rows.requires_grad_(True), labels, mean, std, w)
    f64 = unit_match(rows.detach().double(), labels, mean.double(), std.double(), w.double())
    assert abs(f32.item() / f64.item() - 1) < 1e-3


def test_bf16_and_second_derivatives_take_no_fused_path():
    x = torch.randn(8, 3, generator=_g()).bfloat16().requires_grad_(True)
    assert not _graph_has(moments(x, (0,))[1].sum(), "_Moments")
    y = torch.randn(8, 3, generator=_g(), dtype=torch.float64, requires_grad=True)
    (gy,) = torch.autograd.grad(moments(y, (0,))[1].sum(), y, create_graph=True)
    with pytest.raises(RuntimeError):
        gy.sum().backward()
