"""Streaming statistics against float64 oracles on real activations."""
import pytest
import torch

from dfkd.graph import chain_basis, layer_infos, pair_edges, signal
from dfkd.stats import ClassMoments, SpectralMoments, cholesky_psd, low_rank
from dfkd.taps import default_layers, tap


@pytest.fixture(scope="module")
def acts(teacher, small):
    x = small.train[0][:3000]
    with torch.no_grad(), tap(teacher, default_layers(teacher)) as a:
        teacher(x)
    return {k: v.flatten(1) for k, v in a.items()}, small.train[1][:3000], a["conv2"]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layer, full", [("fc1", True), ("fc3", True), ("conv2", False)])
def test_streaming_moments_equal_torch_cov(acts, layer, full):
    a, y, _ = acts
    x = a[layer]
    m = ClassMoments(10, x.shape[1], full=full)
    for s in range(0, len(x), 437):  # uneven batches, some classes missing from a batch's tail
        m.update(x[s:s + 437], y[s:s + 437])
    for c in range(10):
        xc = x[y == c].double()
        assert m.count[c] == len(xc)
        assert _rel(m.mean[c], xc.mean(0)) < 1e-6
        oracle = torch.cov(xc.T)
        got = m.covariance()[c]
        if full:
            assert _rel(got, oracle) < 1e-6
            assert torch.equal(got, got.T) or _rel(got, got.T) < 1e-12
            assert torch.linalg.eigvalsh(got).min() > -1e-9 * oracle.abs().max()
        else:
            assert _rel(got, oracle.diagonal()) < 1e-6


@pytest.mark.parametrize("full", [True, False])
def test_pooled_channel_moments_equal_torch_cov(acts, full):
    """A conv map per channel: every position of every sample one row of the class (float64 oracle)."""
    _, y, maps = acts
    m = ClassMoments(10, 16, full=full)
    for s in range(0, len(maps), 700):
        m.update(maps[s:s + 700].flatten(2), y[s:s + 700])
    for c in (0, 4, 9):
        rows = maps[y == c].permute(0, 2, 3, 1).reshape(-1, 16).double()
        assert m.count[c] == len(rows)
        assert _rel(m.mean[c], rows.mean(0)) < 1e-6
        oracle = torch.cov(rows.T)
        assert _rel(m.covariance()[c], oracle if full else oracle.diagonal()) < 1e-5


def test_cholesky_jitter_on_rank_deficient_covariance(acts):
    a, y, _ = acts
    x = a["fc1"][y == 0][:50].double()  # 50 samples, 120 units: rank <= 49
    cov = torch.cov(x.T)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(cov)
    chol, jitter = cholesky_psd(cov)
    scale = cov.diagonal().mean().item()
    assert 0 < jitter <= 1e-6 * scale * 10 ** 11
    assert _rel(chol @ chol.T, cov + jitter * torch.eye(120)) < 1e-9
    full_rank = torch.cov(a["fc3"][y == 0].double().T)
    chol2, j2 = cholesky_psd(full_rank)
    assert j2 == 0.0 and _rel(chol2 @ chol2.T, full_rank) < 1e-12


def test_low_rank_keeps_diagonal_and_top_directions(acts):
    a, y, _ = acts
    cov = torch.cov(a["fc2"][y == 3].double().T)
    f, r = low_rank(cov, 8)
    approx = f @ f.T + torch.diag(r)
    assert _rel(approx.diagonal(), cov.diagonal()) < 1e-9
    vals, vecs = torch.linalg.eigh(cov)
    top = vecs[:, -1]
    assert abs((top @ approx @ top - vals[-1]).item()) / vals[-1].item() < 0.05


def test_fourier_basis_orthonormal_and_invertible(teacher, small, acts):
    infos = layer_infos(teacher, default_layers(teacher), small.train[0][:2])
    vals, v = chain_basis(teacher, infos)
    n = sum(i.nodes for i in infos)
    assert v.shape == (n, n) == (236, 236)
    assert _rel(v.T @ v, torch.eye(n, dtype=torch.float64)) < 1e-10
    assert vals.min() > -1e-9 and abs(vals[0].item()) < 1e-9  # Laplacian: PSD with a zero mode
    x = small.train[0][:64]
    with torch.no_grad(), tap(teacher, default_layers(teacher)) as a:
        teacher(x)
    s = signal(a, infos).double()
    s_hat = s @ v  # s_hat = V^T s for each row
    assert _rel(s_hat @ v.T, s) < 1e-10  # the inverse transform gives the signal back
    # the graph is the weights': an oracle Laplacian built edge by edge from the kernels' L1 norms
    # (conv1 -> conv2 -> fc1 -> fc2 -> fc3) has these eigenpairs
    lap = torch.zeros(n, n, dtype=torch.float64)
    offs = [0]
    for i in infos:
        offs.append(offs[-1] + i.nodes)
    for k, (a, b) in enumerate(zip(infos[:-1], infos[1:])):
        w = dict(teacher.named_modules())[b.path].weight.detach().double().abs()
        w = w.sum((2, 3)) if w.dim() == 4 else w.view(w.shape[0], a.nodes, -1).sum(2)  # [out, in] between nodes
        for j in range(b.nodes):
            for i in range(a.nodes):
                lap[offs[k] + i, offs[k + 1] + j] -= w[j, i]
                lap[offs[k + 1] + j, offs[k] + i] -= w[j, i]
    lap -= torch.diag(lap.sum(1))
    assert _rel(v @ torch.diag(vals) @ v.T, lap) < 1e-10
    assert torch.allclose(pair_edges(teacher, infos[0], infos[1]), teacher.conv2.weight.detach().double().abs()
                          .sum((2, 3)).T)


def test_spectral_moments_equal_oracle(teacher, small):
    infos = layer_infos(teacher, default_layers(teacher), small.train[0][:2])
    _, v = chain_basis(teacher, infos)
    x, y = small.train[0][:3000], small.train[1][:3000]
    with torch.no_grad(), tap(teacher, default_layers(teacher)) as a:
        teacher(x)
    s = signal(a, infos)
    sm = SpectralMoments(v, 10, keep=0.1, select_n=1000)
    for i in range(0, 3000, 300):
        sm.update(s[i:i + 300], y[i:i + 300])
    sm.finish()
    coef = s.double() @ v
    energy = (coef[:1000] ** 2).mean(0)
    # the kept set is the top 24 by energy; float32 projections may only swap near-ties
    kth = torch.sort(energy, descending=True).values[23]
    assert len(sm.kept) == 24 and torch.equal(sm.kept, sm.kept.unique())
    assert energy[sm.kept].min() >= kth * (1 - 1e-5)
    kept = sm.kept
    for c in range(10):
        cc = coef[y == c][:, kept]
        assert _rel(sm.moments.mean[c], cc.mean(0)) < 1e-6
        assert _rel(sm.moments.covariance()[c], cc.var(0)) < 1e-6
