"""Private metadata (``dfkd record --privacy``): the accountant against an independent formula, the
noise each release carries against its calibration, clipping and post-processing against float64
oracles, and an empirical audit with a canary that must find the unprotected file and must not
find more than the claimed epsilon in the private one. The model is one dfkd did not define
(BatchNorm, GELU, a residual block, global pooling) on 3-channel images made here."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from dfkd import privacy
from dfkd.cli import main
from dfkd.config import RecordConfig
from dfkd.data import DataInfo
from dfkd.metadata import load
from dfkd.recording import record


class Tiny(nn.Module):
    """A small BN/GELU/residual CNN with global average pooling."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        h = nn.functional.gelu(self.bn(self.stem(x)))
        h = h + nn.functional.gelu(self.conv(h))
        return self.head(h.mean((2, 3)))


INFO = DataInfo(shape=(3, 8, 8), num_classes=3, low=0.0, high=1.0, name="colour blobs")


def blobs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour images whose class is the brightest channel (values in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y] += 0.4
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of mu-Gaussian differential privacy (Dong, Roth & Su 2019), written here with erf."""
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


@pytest.mark.parametrize("eps,records,bounds", [(1.0, 5, 0), (0.3, 11, 0), (10.0, 3, 3), (3.0, 2, 1)])
def test_accountant_against_gaussian_dp(eps, records, bounds):
    """Gaussian mechanisms compose to one with mu = sqrt(sum 1/z^2): the claimed (epsilon, delta) must hold
    by that formula (independent of dp-accounting), and be nearly tight (no noise wasted)."""
    names = [f"r{i}" for i in range(records)]
    b = privacy.Budget.new(eps, None, 60_000, names, {n: 1.0 for n in names[:bounds]})
    b.choose_bounds({n: privacy.histogram(torch.ones(100)) for n in names[bounds:]})
    h = b.header()
    assert h["delta"] == 1e-6 and h["epsilon"] <= eps
    assert abs(sum(e["share"] for e in h["events"]) - 1) < 1e-9
    assert len(h["events"]) == 1 + 2 * records + (records - bounds)
    mu = math.sqrt(sum(1 / e["noise_multiplier"] ** 2 for e in h["events"]))
    assert gdp_delta(h["epsilon"], mu) <= h["delta"] * 1.001
    assert gdp_delta(eps * 0.99, mu) > h["delta"]  # 1% less epsilon would not hold: the noise is not wasted
    for e in h["events"]:
        assert e["sigma"] == pytest.approx(e["noise_multiplier"] * e["sensitivity"])


def test_release_noise_matches_calibration():
    """Over 2,000 releases the noise on each released quantity has the std the header states."""
    x = torch.randn(40, 5, dtype=torch.float64) * 3
    y = torch.arange(40) % 2
    b = privacy.Budget.new(1.0, 1e-5, 40, ["r"], {"r": 4.0}, noise_seed=7)
    base = privacy.ClippedMoments(2, 5, True, 4.0)
    base.update(x, y)
    counts = torch.tensor([20.0, 20.0])
    ds, dq = [], []
    for _ in range(2000):
        m = privacy.ClippedMoments(2, 5, True, 4.0)
        m.sum, m.second = base.sum.clone(), base.second.clone()
        b.release("r", m, counts)
        ds.append(m.sum - base.sum)
        dq.append(m.second - base.second)
    ds, dq = torch.stack(ds), torch.stack(dq)
    h = {e["release"]: e for e in b.header()["events"]}
    assert ds.std().item() == pytest.approx(h["r: sum"]["sigma"], rel=0.05)
    assert dq.std().item() == pytest.approx(h["r: second moment"]["sigma"], rel=0.05)
    assert torch.equal(dq, dq.transpose(-1, -2))  # symmetric noise, each entry drawn once
    assert abs(float(torch.corrcoef(torch.stack([dq[:, 0, 0, 1], dq[:, 0, 1, 2]]))[0, 1])) < 0.1
    noisy = torch.stack([b.noisy_counts(torch.tensor([10_000, 10_000])) for _ in range(2000)]).double()
    assert (noisy - 10_000).std().item() == pytest.approx(h["count"]["sigma"], rel=0.05)


def test_clipping_and_post_processing_against_float64():
    """Unclipped sums are the plain float64 sums (pooled maps: per-position moments / P); a huge example
    contributes norm exactly the bound; post-processing gives the population mean and covariance
    (torch.cov) and PSD matrices however strong the noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, 6, generator=g, dtype=torch.float64)
    y = torch.arange(30) % 3
    m = privacy.ClippedMoments(3, 4, True, 1e9)
    m.update(x, y)
    r = privacy.finish(m, torch.bincount(y).double())
    for c in range(3):
        rows = x[y == c].transpose(1, 2).reshape(-1, 4)  # every position a draw of the channel vector
        assert torch.allclose(r.mean[c], rows.mean(0), atol=1e-12)
        assert torch.allclose(r.cov[c], torch.cov(rows.T, correction=0), atol=1e-10)
    big = privacy.ClippedMoments(1, 4, True, 2.0)
    big.update(torch.full((1, 4), 100.0), torch.zeros(1, dtype=torch.long))
    assert big.sum.norm().item() == pytest.approx(2.0) and torch.linalg.matrix_norm(big.second).item() == pytest.approx(4.0)
    pooled = privacy.ClippedMoments(1, 4, False, 2.0)
    pooled.update(torch.full((1, 4, 9), -50.0), torch.zeros(1, dtype=torch.long))
    assert pooled.sum.norm().item() <= 2.0 + 1e-9 and pooled.second.norm().item() <= 4.0 + 1e-9
    noisy = torch.randn(3, 6, 6, dtype=torch.float64) * 10
    vals = torch.linalg.eigvalsh(privacy.psd(noisy + noisy.transpose(1, 2)))
    assert vals.min().item() > -1e-9


def test_histogram_quantile_picks_the_bound():
    r = torch.cat([torch.full((950,), 3.0), torch.full((50,), 1000.0)])
    h = privacy.histogram(r)
    assert int(h.sum()) == 1000 and int(h[privacy.histogram(torch.tensor([3.0])).argmax()]) == 950
    b = privacy.Budget.new(10.0, 1e-6, 1000, ["r"], quantile=0.9, noise_seed=0)
    b.choose_bounds({"r": h})
    assert 3.0 <= b.bounds["r"] <= 3.0 * 2 ** 0.5  # the upper edge of 3's cell


def test_private_file_on_a_model_dfkd_did_not_define(tiny, tmp_path):
    """Every kind on the BN/GELU/residual model and colour images: the file validates, states its
    guarantee, and the same noise seed gives the same file; counts and means are near the exact ones."""
    x, y = blobs(600)
    kinds = ("top-layer", "all-layers", "spectral-all", "spectral-pairs")
    cfg = RecordConfig(kinds=kinds, progress=False, privacy=3.0, noise_seed=1, batch_size=128)
    a, b = record(tiny, (x, y), cfg, INFO), record(tiny, (x, y), cfg, INFO)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    c = record(tiny, (x, y), RecordConfig(kinds=kinds, progress=False, privacy=3.0, batch_size=128), INFO)
    assert not torch.equal(a.tensors["top-layer/mean"], c.tensors["top-layer/mean"])  # secret noise differs
    exact = record(tiny, (x, y), RecordConfig(kinds=kinds, progress=False), INFO)
    p = a.header["privacy"]
    assert p["epsilon"] <= 3.0 and p["delta"] == 1e-4 and p["accountant_version"]
    records = {"top-layer", "all-layers/stem", "all-layers/conv", "all-layers/head", "spectral-all",
               "spectral-pairs/stem+conv", "spectral-pairs/conv+head"}
    assert set(p["clip_bounds"]) == records
    assert a.header["recorded_on"]["input_min"] == [0.0] * 3  # the declared range, not the data's
    assert abs(int(a.tensors["count"].sum()) - 600) < 6 * p["events"][0]["sigma"] * 2
    path = tmp_path / "p.stats.safetensors"
    from dfkd.metadata import save
    save(a, path)
    assert load(path).header["privacy"] == p
    err = (a.tensors["all-layers/head/mean"] - exact.tensors["all-layers/head/mean"]).norm()
    assert err < 0.5 * exact.tensors["all-layers/head/mean"].norm()
    for k, t in a.tensors.items():
        if k.endswith("/chol"):
            assert torch.isfinite(t).all()


def _audit(tiny, private: bool, trials: int) -> float:
    """An empirical lower bound on epsilon: record with and without one canary (an outlier image of class
    0) ``trials`` times each; project the released class-0 means of the first layer and the logits on the
    canary's own direction; pick a threshold on one half, count errors on the other, and turn the
    Clopper-Pearson bounds (95%) on both error rates into epsilon (Jagielski et al., 2020)."""
    from scipy.stats import beta
    x, y = blobs(90, seed=3)
    canary = torch.zeros(1, 3, 8, 8)
    canary[0, 2, ::2] = 1.0  # stripes in the wrong channel for class 0
    xs, ys = torch.cat([x, canary]), torch.cat([y, torch.zeros(1, dtype=torch.long)])
    with torch.no_grad():
        u = {"all-layers/stem/mean": tiny.stem(canary).mean((2, 3))[0], "top-layer/mean": tiny(canary)[0] / 8}
    u = {k: v / v.norm() for k, v in u.items()}

    def stat(data, seed):
        cfg = RecordConfig(kinds=("top-layer", "all-layers"), layers=("stem",), progress=False, batch_size=128,
                           privacy=1.0 if private else None, noise_seed=seed if private else None)
        m = record(tiny, data, cfg, INFO)
        return sum(float(m.tensors[k][0].double() @ v.double()) for k, v in u.items())

    out = [stat((x, y), s) for s in range(trials)]
    inn = [stat((xs, ys), 10_000 + s) for s in range(trials)]
    h = trials // 2
    thr = (statistics.mean(out[:h]) + statistics.mean(inn[:h])) / 2
    sign = 1 if statistics.mean(inn[:h]) > statistics.mean(out[:h]) else -1
    fp = sum(sign * (v - thr) > 0 for v in out[h:])
    fn = sum(sign * (v - thr) <= 0 for v in inn[h:])
    n = trials - h
    fpr = 1.0 if fp == n else beta.ppf(0.95, fp + 1, n - fp)
    fnr = 1.0 if fn == n else beta.ppf(0.95, fn + 1, n - fn)
    delta = 1e-3  # the tiny set's default: 10^-(ceil(log10 91) + 1)
    best = max((1 - delta - fnr) / fpr, (1 - delta - fpr) / fnr)
    return max(math.log(best), 0.0) if best > 0 else 0.0


@pytest.mark.parametrize("trials", [pytest.param(400, id="ci"), pytest.param(4000, marks=pytest.mark.slow, id="slow")])
def test_canary_audit(tiny, trials):
    """The same distinguisher finds the canary in exact files (so the audit is not blind: with 200 held-out
    trials per side, 4.2 is the most it can show) and finds no more than the claimed epsilon = 1 in
    private ones."""
    assert _audit(tiny, private=False, trials=400) > 3.5
    assert _audit(tiny, private=True, trials=trials) < 1.0


def test_cli_record_and_inspect(world, tmp_path, capsys):
    out = tmp_path / "p.stats.safetensors"
    assert main(["record", "--teacher", str(world.teacher), "--kinds", "top-layer,all-layers", "--privacy", "1",
                 "--clip", "top-layer=3", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "differential privacy" in said and "note:" not in said  # no "exact class means" note for a private file
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "privacy: (1, 1e-05)-differential privacy (the accountant's epsilon: 0.99" in shown  # 1,876 examples
    assert "clip top-layer: 3 (user)" in shown and "clip all-layers/conv1:" in shown
    assert "noise all-layers/fc1: second moment: multiplier" in shown and "dp_accounting PLD" in shown
    assert main(["inspect", str(world.stats)]) == 0
    assert "privacy: none" in capsys.readouterr().out
    assert main(["publish", "--teacher", str(world.teacher), "--stats", str(out), "--out", str(tmp_path / "pub")]) == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "(1, 1e-05)-differentially private" in card and "not the weights" in card


def test_readme_privacy_section_runs_as_written(world, tmp_path):
    """The README's private-metadata commands, as written (small sizes appended), on a saved teacher."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_cli import SMALL, readme_commands
    cmds = [c for c in readme_commands("## Private metadata") if c[0] == "dfkd"]
    assert [c[1] for c in cmds] == ["record", "inspect", "reconstruct", "publish"]
    (tmp_path / "runs" / "mnist").mkdir(parents=True)
    for f in ("teacher.json", "teacher.safetensors"):
        shutil.copy(world.dir / f, tmp_path / "runs" / "mnist" / f)
    said = {}
    for cmd in cmds:
        extra = SMALL.get(cmd[1], []) + (["--quiet"] if cmd[1] in ("record", "reconstruct") else [])
        r = subprocess.run([sys.executable, "-m", "dfkd"] + cmd[1:] + extra, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600, env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, (cmd, r.stderr)
        said[cmd[1]] = r.stdout
    assert "differential privacy (the accountant's epsilon" in said["inspect"]
    assert "differentially private" in (tmp_path / "lenet5-mnist" / "README.md").read_text()
