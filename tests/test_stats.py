"""Streaming statistics against float64 oracles on real activations."""
import pytest
import torch

from dfkd.data import to_input
from dfkd.graph import chain_basis, layer_infos, signal
from dfkd.stats import ClassMoments, SpectralMoments, cholesky_psd, laplacian, low_rank
from dfkd.taps import default_layers, tap


@pytest.fixture(scope="module")
def acts(teacher, small):
    x = to_input(small.train_x[:3000], (1, 32, 32))
    with torch.no_grad(), tap(teacher, default_layers(teacher)) as a:
        teacher(x)
    return {k: v.flatten(1) for k, v in a.items()}, small.train_y[:3000]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layer, full", [("fc1", True), ("fc3", True), ("conv2", False)])
def test_streaming_moments_equal_torch_cov(acts, layer, full):
    a, y = acts
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


def test_cholesky_jitter_on_rank_deficient_covariance(acts):
    a, y = acts
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
    a, y = acts
    cov = torch.cov(a["fc2"][y == 3].double().T)
    f, r = low_rank(cov, 8)
    approx = f @ f.T + torch.diag(r)
    assert _rel(approx.diagonal(), cov.diagonal()) < 1e-9
    vals, vecs = torch.linalg.eigh(cov)
    top = vecs[:, -1]
    assert abs((top @ approx @ top - vals[-1]).item()) / vals[-1].item() < 0.05


def test_fourier_basis_orthonormal_and_invertible(teacher, small, acts):
    infos = layer_infos(teacher, default_layers(teacher), to_input(small.train_x[:2], (1, 32, 32)))
    vals, v = chain_basis(teacher, infos)
    n = sum(i.nodes for i in infos)
    assert v.shape == (n, n) == (236, 236)
    assert _rel(v.T @ v, torch.eye(n, dtype=torch.float64)) < 1e-10
    assert vals.min() > -1e-9 and abs(vals[0].item()) < 1e-9  # Laplacian: PSD with a zero mode
    x = to_input(small.train_x[:64], (1, 32, 32))
    with torch.no_grad(), tap(teacher, default_layers(teacher)) as a:
        teacher(x)
    s = signal(a, infos).double()
    s_hat = s @ v  # s_hat = V^T s for each row
    assert _rel(s_hat @ v.T, s) < 1e-10  # the inverse transform gives the signal back
    # the graph is the weights': the Laplacian from the oracle adjacency has these eigenvectors
    assert laplacian(torch.ones(3, 3) - torch.eye(3)).sum() == 0


def test_spectral_moments_equal_oracle(teacher, small):
    infos = layer_infos(teacher, default_layers(teacher), to_input(small.train_x[:2], (1, 32, 32)))
    _, v = chain_basis(teacher, infos)
    x = to_input(small.train_x[:3000], (1, 32, 32))
    y = small.train_y[:3000]
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
