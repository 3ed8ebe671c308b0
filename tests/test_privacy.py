"""Private metadata (``dfkd record --privacy``): the accountant against an independent formula, the
noise each release carries against its calibration, clipping and post-processing against float64
oracles, noise from the operating system's entropy and never from a seed, a header with no value
read off the examples, loose clip bounds reported, and a canary audit that passes the real noise
and fails noise divided by 2 (with both error probabilities computed). The model is one dfkd did not
define (BatchNorm, GELU, a residual block, global pooling) on 3-channel images made here."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import struct

import numpy as np
import pytest
import torch
from torch import nn

from dfkd import audit, noise, privacy
from dfkd.cli import main
from dfkd.config import RecordConfig
from dfkd.data import DataInfo
from dfkd.errors import DfkdError
from dfkd.metadata import load, save
from dfkd.privacy_report import clip_report, clip_warnings
from dfkd.recording import record, record_file
from dfkd.specs import DataRef, ModelRef


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


@pytest.fixture
def test_noise(monkeypatch):
    """The tests' reproducible (and NOT private) noise."""
    monkeypatch.setattr(noise, "INSECURE_TEST_NOISE_SEED", 20240601)


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


def test_release_noise_matches_calibration(test_noise):
    """Over 2,000 releases the noise on each released quantity has the std the header states."""
    x = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    y = torch.arange(40) % 2
    b = privacy.Budget.new(1.0, 1e-5, 40, ["r"], {"r": 4.0})
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
    assert torch.allclose(dq, dq.transpose(-1, -2), rtol=0, atol=1e-9)  # symmetric noise (Q itself: to 1e-15)
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


def test_histogram_quantile_picks_the_bound(test_noise):
    r = torch.cat([torch.full((950,), 3.0), torch.full((50,), 1000.0)])
    h = privacy.histogram(r)
    assert int(h.sum()) == 1000 and int(h[privacy.histogram(torch.tensor([3.0])).argmax()]) == 950
    b = privacy.Budget.new(10.0, 1e-6, 1000, ["r"], quantile=0.9)
    b.choose_bounds({"r": h})
    assert 3.0 <= b.bounds["r"] <= 3.0 * 2 ** 0.5  # the upper edge of 3's cell


def test_private_file_on_a_model_dfkd_did_not_define(tiny, tmp_path, monkeypatch):
    """Every kind on the BN/GELU/residual model and colour images: the file validates and states its
    guarantee; counts and means are near the exact ones. The header's range is the declared one, not the
    data's: declared -1..2 around data in 0..1, it holds -1 and 2, which the data's own minimum and
    maximum (computed here) are not."""
    x, y = blobs(600)
    kinds = ("top-layer", "all-layers", "spectral-all", "spectral-pairs")
    monkeypatch.setattr(noise, "INSECURE_TEST_NOISE_SEED", 1)
    declared = dataclasses.replace(INFO, low=-1.0, high=2.0)
    a = record(tiny, (x, y), RecordConfig(kinds=kinds, privacy=3.0, batch_size=128), declared)
    monkeypatch.setattr(noise, "INSECURE_TEST_NOISE_SEED", None)
    exact = record(tiny, (x, y), RecordConfig(kinds=kinds), INFO)
    p = a.header["privacy"]
    assert p["epsilon"] <= 3.0 and p["delta"] == 1e-6 and p["accountant_version"]
    records = {"top-layer", "all-layers/stem", "all-layers/conv", "all-layers/head", "spectral-all",
               "spectral-pairs/stem+conv", "spectral-pairs/conv+head"}
    assert set(p["clip_bounds"]) == records
    seen = x.transpose(0, 1).reshape(3, -1)
    assert a.header["recorded_on"]["input_min"] == [-1.0] * 3 != seen.amin(1).tolist()
    assert a.header["recorded_on"]["input_max"] == [2.0] * 3 != seen.amax(1).tolist()
    assert (a.header["data"]["low"], a.header["data"]["high"]) == (-1.0, 2.0)
    assert abs(int(a.tensors["count"].sum()) - 600) < 6 * p["events"][0]["sigma"] * 2
    path = tmp_path / "p.stats.safetensors"
    save(a, path)
    assert load(path).header["privacy"] == p
    err = (a.tensors["all-layers/head/mean"] - exact.tensors["all-layers/head/mean"]).norm()
    assert err < 0.5 * exact.tensors["all-layers/head/mean"].norm()
    for k, t in a.tensors.items():
        if k.endswith("/chol"):
            assert torch.isfinite(t).all()


# --- noise from the operating system's entropy, never from a seed ---------------------------------------

def test_noise_comes_from_os_urandom(monkeypatch):
    """The draws are Box-Muller on os.urandom's bytes: with os.urandom replaced by known bytes, the noise
    equals the transform computed here with struct and math (little-endian 64-bit words, top 53 bits),
    and 200,000 draws from fixed bytes have mean 0 and std 1 (within 9 and 6 standard errors)."""
    known = random.Random(5).randbytes(16 * 100_000)
    calls = []
    monkeypatch.setattr(noise.os, "urandom", lambda n: calls.append(n) or known[:n])
    z = noise.NoiseSource().normal((5,))
    words = struct.unpack("<6Q", known[:48])
    u1, u2 = [w >> 11 for w in words[:3]], [w >> 11 for w in words[3:]]
    r = [math.sqrt(-2 * math.log(1 - a * 2.0 ** -53)) for a in u1]
    want = [ri * math.cos(2 * math.pi * b * 2.0 ** -53) for ri, b in zip(r, u2)] + \
           [ri * math.sin(2 * math.pi * b * 2.0 ** -53) for ri, b in zip(r, u2)]
    assert calls == [48] and torch.allclose(z, torch.tensor(want[:5], dtype=torch.float64), rtol=0, atol=1e-12)
    big = noise.NoiseSource().normal((200_000,))
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.01


def test_no_user_noise_seed(tiny, tmp_path, capsys, monkeypatch):
    """No seed reaches the noise: the config has no noise seed, the command line refuses one, two private
    records of the same data differ, and no header holds a seed. Only the tests' hook makes the noise
    reproducible, giving byte-identical files that say they are NOT private."""
    assert "noise_seed" not in {f.name for f in dataclasses.fields(RecordConfig)}
    assert main(["record", "--teacher", "lenet5", "--privacy", "1", "--noise-seed", "3", "--out", "x"]) == 2
    assert "--noise-seed" in capsys.readouterr().err
    x, y = blobs(90)
    cfg = RecordConfig(kinds=("top-layer",), privacy=1.0, clip=(("top-layer", 2.0),))
    a, b = record(tiny, (x, y), cfg, INFO), record(tiny, (x, y), cfg, INFO)
    assert not torch.equal(a.tensors["top-layer/mean"], b.tensors["top-layer/mean"])
    for m in (a, b):
        assert "seed" not in json.dumps(m.header).lower() and m.header["privacy"]["noise"] == noise.NOISE_SECURE
    monkeypatch.setattr(noise, "INSECURE_TEST_NOISE_SEED", 7)
    files = []
    for i in range(2):
        save(record(tiny, (x, y), cfg, INFO), tmp_path / f"{i}.stats.safetensors")
        files.append((tmp_path / f"{i}.stats.safetensors").read_bytes())
    assert files[0] == files[1]
    h = load(tmp_path / "0.stats.safetensors").header["privacy"]
    assert "NOT private" in h["noise"] and "7" not in h["noise"]


def test_budget_noise_is_never_torch_seeded():
    """A Budget built without ``new`` draws secure noise too (not a default-seeded torch generator)."""
    a, b = privacy.Budget(1.0, 1e-6, ["r"], {"r": 1.0}), privacy.Budget(1.0, 1e-6, ["r"], {"r": 1.0})
    ca, cb = a.noisy_counts(torch.full((50,), 1000)), b.noisy_counts(torch.full((50,), 1000))
    assert not a.noise.insecure and not torch.equal(ca, cb)


# --- the header: released with noise, or public by someone's choice ----------------------------------------

def test_default_delta_is_fixed_not_derived_from_the_size():
    """The default delta is 1e-6 whatever the size (a power of ten of n would tell neighbours apart at
    10^k examples); above 100,000 examples the user must give it."""
    for n in (90, 999, 1000, 1001, 60_000, 100_000):
        assert privacy.Budget.new(1.0, None, n, ["r"]).delta == 1e-6
    with pytest.raises(DfkdError) as e:
        privacy.Budget.new(1.0, None, 100_001, ["r"])
    assert e.value.where == "delta" and "100,000" in e.value.problem
    assert privacy.Budget.new(1.0, 1e-7, 100_001, ["r"]).delta == 1e-7


def _float_npz(path, drop: int | None = None) -> str:
    """Float vectors (6 features, 3 classes) whose maximum 2.75 and minimum -2.5 each sit in one example."""
    g = np.random.default_rng(0)
    x = np.clip(g.normal(size=(120, 6)), -2, 2).astype(np.float32)
    x[7, 3], x[11, 0] = 2.75, -2.5
    y = np.arange(120) % 3
    keep = np.arange(120) != drop
    np.savez(path, x=x[keep], y=y[keep])
    return f"npz:{path}"


def test_private_header_holds_no_exact_data_value(tmp_path, test_noise):
    """On a float npz set (its range read off the data), removing the one example holding the maximum
    changes an exact file's data.high, and a private one's header not at all: the range must be declared
    (--range; refused otherwise), --normalize auto is refused, MEAN/STD is stated as the user's."""
    teacher = ModelRef("hinton-1200", args={"hidden": [8]})
    cfg = RecordConfig(kinds=("top-layer",), privacy=1.0, value_range=(-3.0, 3.0))
    exact, heads = [], []
    for i, drop in enumerate((None, 7)):  # the same file name, holding D, then D less its maximum's example
        d = _float_npz(tmp_path / "d.npz", drop)
        exact.append(record_file(teacher, DataRef(d), tmp_path / f"e{i}.stats.safetensors",
                                 RecordConfig(kinds=("top-layer",)))[1])
        heads.append(record_file(teacher, DataRef(d, normalize="0/1"), tmp_path / f"p{i}.stats.safetensors",
                                 cfg)[1].header)
    assert exact[0].header["data"]["high"] == pytest.approx(2.75) and exact[1].header["data"]["high"] <= 2.0
    full = _float_npz(tmp_path / "d.npz")
    assert heads[0]["data"] == heads[1]["data"] == dict(heads[0]["data"], low=-3.0, high=3.0, mean=[0.0], std=[1.0])
    for k in ("input_min", "input_max", "dataset", "sample_bytes"):
        assert heads[0]["recorded_on"][k] == heads[1]["recorded_on"][k]
    public = heads[0]["privacy"]["public"]
    assert "--range LOW,HIGH" in public["data.low, data.high, recorded_on.input_min, recorded_on.input_max"]
    assert "--normalize MEAN/STD" in public["data.mean, data.std"]
    with pytest.raises(DfkdError) as e:
        record_file(teacher, DataRef(full), tmp_path / "r.stats.safetensors", dataclasses.replace(cfg, value_range=None))
    assert e.value.where == "value_range"
    with pytest.raises(DfkdError) as e:
        record_file(teacher, DataRef(full, normalize="auto"), tmp_path / "n.stats.safetensors", cfg)
    assert e.value.where == "normalize"
    with pytest.raises(DfkdError) as e:  # a declared range must hold the data's values
        record_file(teacher, DataRef(full), tmp_path / "s.stats.safetensors", dataclasses.replace(cfg, value_range=(-2.0, 2.0)))
    assert e.value.where == "value_range" and "-2.5..2.75" in e.value.problem


# --- clip bounds chosen on noisy histograms: loose ones reported --------------------------------------------

def test_choose_cells_and_the_clip_report():
    """Hand-made noisy histograms (noise std z = 100, so cells below 300 count as empty): a noise cell at
    45 above data at 20-21 carries the 95% quantile (bound 2^13, median cell 20: 'far'); nothing above
    300 is a guess (the fullest cell); data alone gives the bound just above it, not loose."""
    far = torch.zeros(privacy.CELLS, dtype=torch.float64)
    far[20], far[21], far[45] = 1000.0, 500.0, 350.0
    assert privacy.choose_cells(far, 100.0, 0.95) == (45, 20, True)
    guess = torch.zeros(privacy.CELLS, dtype=torch.float64)
    guess[33], guess[10] = 250.0, 120.0
    assert privacy.choose_cells(guess, 100.0, 0.95) == (33, 33, False)
    clean = torch.zeros(privacy.CELLS, dtype=torch.float64)
    clean[20], clean[21] = 10_000.0, 1000.0
    assert privacy.choose_cells(clean, 100.0, 0.95) == (21, 20, True)
    med = 2.0 ** (privacy.LOG2_LOW + privacy.LOG2_STEP * 20.5)
    assert clip_report(2.0 ** 13, med, True, 100.0, 1500.0, 1.0)["loose"] == "far"  # 2^13 / 2^0.25 > 10
    assert clip_report(2.0 ** 1, med, True, 100.0, 1500.0, 1.0)["loose"] is None  # 2 / 2^0.25 = 1.7
    assert clip_report(2.0 ** 1, med, True, 100.0, 999.0, 1.0)["loose"] == "few"  # count under 10 z
    assert clip_report(2.0 ** 1, med, False, 100.0, 1e6, 1.0)["loose"] == "guess"
    r = clip_report(2.0 ** 13, med, True, 100.0, 1500.0, 3.0)
    lines = clip_warnings({"clip_bounds": {"all-layers/fc1": {"bound": 2.0 ** 13, "median_norm": med, **r},
                                           "top-layer": {"bound": 1.0, "by": "user"}}})
    assert len(lines) == 1 and lines[0].startswith("clip all-layers/fc1: the bound 8.19e+03 is 6889x the median norm")
    assert "noise std on a class mean's norm 3 (2.5x the median norm)" in lines[0]
    assert "--clip all-layers/fc1=BOUND" in lines[0]


def test_loose_bounds_are_reported_from_released_values(world, tmp_path, capsys, test_noise):
    """Twenty examples are too few for a noisy histogram at epsilon 0.1: dfkd record warns on stderr and
    dfkd inspect repeats it. 100,000 examples in two cells are not: no warning, whatever the noise."""
    x = np.zeros((20, 28, 28), dtype=np.uint8)
    x[:, 10:18, 10:18] = 200
    np.savez(tmp_path / "tiny.npz", x=x, y=np.arange(20) % 10)
    out = tmp_path / "few.stats.safetensors"
    assert main(["record", "--teacher", str(world.teacher), "--data", f"npz:{tmp_path / 'tiny.npz'}", "--kinds",
                 "top-layer", "--privacy", "0.1", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("dfkd: warning: clip top-layer: ") and "--clip top-layer=BOUND" in err
    assert main(["inspect", str(out)]) == 0
    assert "  warning: clip top-layer: " in capsys.readouterr().out
    b = load(out).header["privacy"]["clip_bounds"]["top-layer"]
    assert b["loose"] in ("guess", "few") and b["released_n"] == float(load(out).tensors["count"].sum())
    many = privacy.Budget.new(1.0, None, 100_000, ["r"])
    many.choose_bounds({"r": privacy.histogram(torch.cat([torch.full((60_000,), 3.0), torch.full((40_000,), 5.0)]))})
    m = privacy.ClippedMoments(2, 4, False, many.bounds["r"])
    many.release("r", m, torch.tensor([50_000.0, 50_000.0]))
    assert many.chosen["r"]["loose"] is None and clip_warnings(many.header()) == []


# --- the canary audit ------------------------------------------------------------------------------------------

def test_audit_design_error_probabilities():
    """Computed, not guessed: with 200,000 trials a side at a claimed (1, 1e-3), noise divided by any
    factor from 2 to 10^6 drives the lower bound above 1 with probability at least 1 - 1e-6 (the bound
    it then reaches with that probability, from the binomial quantiles of its errors); the Clopper-Pearson
    bound itself against its closed form at zero events, 1 - (a)^(1/n)."""
    factors = (2.0, 2.5, 3.5, 5.0, 12.0, 32.0, 1e6)
    d = audit.design(1.0, 1e-3, 200_000, at=factors)
    assert d["typical"] < 1.0 and min(d["detects"][f] for f in factors) > 1.0, d["detects"]
    assert float(audit.cp_upper(0, 1000, 1e-6)) == pytest.approx(1 - 1e-6 ** (1 / 1000), rel=1e-9)
    assert audit.gdp_mu(1.0, 1e-3) == pytest.approx(0.3876, abs=1e-3)
    assert gdp_delta(1.0, audit.gdp_mu(1.0, 1e-3)) == pytest.approx(1e-3, rel=1e-6)


def test_canary_audit_passes_real_noise_fails_half(test_noise, monkeypatch):
    """The audit through the real clipping and noise code: the real multipliers pass (lower bound at most
    the claimed 1), and each mutant fails: every multiplier divided by 2 or by 8, clipping at twice the
    bound, and a second moment noised for sensitivity C instead of C^2."""
    real = audit.audit(1.0, 1e-3)
    assert real["passes"] and real["epsilon_lb"] < 1.0
    multiplier, norms, release = privacy.Budget.multiplier, privacy.norms, privacy.Budget.release
    for f in (2, 8):
        monkeypatch.setattr(privacy.Budget, "multiplier", lambda self, ev, f=f: multiplier(self, ev) / f)
        assert not audit.audit(1.0, 1e-3)["passes"], f
    monkeypatch.setattr(privacy.Budget, "multiplier", multiplier)
    monkeypatch.setattr(privacy, "norms", lambda x: norms(x) / 2)  # a canary kept at twice the bound
    assert not audit.audit(1.0, 1e-3)["passes"]
    monkeypatch.setattr(privacy, "norms", norms)

    def c_not_c2(self, name, m, counts):
        m.sum += privacy.noise_like(m.sum, self.multiplier(f"{name}: sum") * m.bound, self.noise)
        m.second += privacy.noise_like(m.second, self.multiplier(f"{name}: second moment") * m.bound, self.noise)
        return privacy.finish(m, counts)
    monkeypatch.setattr(privacy.Budget, "release", c_not_c2)
    assert not audit.audit(1.0, 1e-3)["passes"]
    monkeypatch.setattr(privacy.Budget, "release", release)
    assert audit.audit(1.0, 1e-3)["passes"]


def test_release_audit_design_error_probabilities():
    """Computed, not guessed (exact noncentral-t laws of mu_hat, 42,000 draws a side): at a claimed (1, 1e-3) each
    release kind's Gaussian-DP mu comes from the accountant (count and clip histogram 0.0868, each sum and second
    moment 0.184) and they compose to the claim's mu; correct code fails a kind's interval with probability
    2e-7 (at most 1e-6 over all five kinds), and a kind whose multiplier alone is halved passes it with
    probability at most 8.4e-14 (count, clip histogram) and 1e-101 (sum, second moment, full covariance)."""
    d = audit.release_design(1.0, 1e-3, 42_000)
    assert d["composed_mu"] == pytest.approx(audit.gdp_mu(1.0, 1e-3), rel=1e-3)
    assert sum(v["p_false_alarm"] for v in d["kinds"].values()) <= 1e-6
    for kind, v in d["kinds"].items():
        assert v["p_miss_halved"] <= 1e-6, kind
        assert v["lo"] < v["mu"] < v["hi"] < 2 * v["mu"], kind
    assert d["kinds"]["count"]["mu"] == pytest.approx(math.sqrt(0.05) * d["composed_mu"], rel=1e-9)
    assert d["kinds"]["sum"]["mu"] == pytest.approx(math.sqrt(0.225) * d["composed_mu"], rel=1e-9)


def test_release_audit_each_kind_against_its_own_share(test_noise, monkeypatch):
    """Each release (count, clip histogram, sum, diagonal second moment, full covariance) through its real
    release function on neighbouring inputs (a canary adding 1 to a count, 1 to one histogram cell, C to a sum,
    C^2 to a second moment, the rank-one C^2 e0 e0^T to a full one), against the mu the accountant gives its
    share: the real code passes every kind, and halving one kind's multiplier fails exactly that kind (as do a
    multiplier divided by 1000 and exact counts). Error probabilities (test_release_audit_design_error_
    probabilities): correct code fails with probability at most 1e-6, a halved kind passes with probability at
    most 8.4e-14; the noise here is the fixed test stream, so the outcome is fixed too."""
    real = audit.release_audit()
    assert real["passes"] and real["failed"] == [], real["kinds"]
    multiplier, release, noise_like = privacy.Budget.multiplier, privacy.Budget.release, privacy.noise_like

    def scaled(match, f):
        return lambda self, ev: multiplier(self, ev) / (f if ev.endswith(match) else 1)
    for match, kinds in [("count", ["count"]), ("clip histogram", ["clip histogram"]), (": sum", ["sum"]),
                         ("second moment", ["second moment", "full covariance"])]:
        for f in (2, 1000):
            monkeypatch.setattr(privacy.Budget, "multiplier", scaled(match, f))
            got = audit.release_audit()
            assert not got["passes"] and got["failed"] == kinds, (match, f, got["failed"])
    monkeypatch.setattr(privacy.Budget, "multiplier", multiplier)

    diagonal_only = []  # the diagonal second moment alone halved (the full path keeps its multiplier)

    def diag_release(self, name, m, counts):
        diagonal_only.append(not m.full)
        try:
            return release(self, name, m, counts)
        finally:
            diagonal_only.pop()
    monkeypatch.setattr(privacy.Budget, "release", diag_release)
    monkeypatch.setattr(privacy.Budget, "multiplier", lambda self, ev: multiplier(self, ev) / (
        2 if ev.endswith("second moment") and diagonal_only and diagonal_only[-1] else 1))
    assert audit.release_audit()["failed"] == ["second moment"]
    monkeypatch.setattr(privacy.Budget, "release", release)
    monkeypatch.setattr(privacy.Budget, "multiplier", multiplier)

    monkeypatch.setattr(privacy, "noise_like", lambda t, sigma, source, symmetric=False:  # the full path alone
                        noise_like(t, sigma / (2 if symmetric else 1), source, symmetric))
    assert audit.release_audit()["failed"] == ["full covariance"]
    monkeypatch.setattr(privacy, "noise_like", noise_like)

    monkeypatch.setattr(privacy.Budget, "noisy_counts", lambda self, counts: counts.double())  # exact counts
    assert audit.release_audit()["failed"] == ["count"]


def test_cli_record_and_inspect(world, tmp_path, capsys):
    out = tmp_path / "p.stats.safetensors"
    assert main(["record", "--teacher", str(world.teacher), "--kinds", "top-layer,all-layers", "--privacy", "1",
                 "--clip", "top-layer=3", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "differential privacy" in said and "note:" not in said  # no "exact class means" note for a private file
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "privacy: (1, 1e-06)-differential privacy (the accountant's epsilon: 0.99" in shown
    assert "clip top-layer: 3 (user)" in shown and "clip all-layers/conv1:" in shown
    assert "noise all-layers/fc1: second moment: multiplier" in shown and "dp_accounting PLD" in shown
    assert "public, not protected: data.mean, data.std: the teacher's own normalisation" in shown
    assert "the data format's fixed range (8-bit images: 0..1)" in shown and "delta: the fixed default" in shown
    assert main(["inspect", str(world.stats)]) == 0
    assert "privacy: none" in capsys.readouterr().out
    assert main(["publish", "--teacher", str(world.teacher), "--stats", str(out), "--out", str(tmp_path / "pub")]) == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "(1, 1e-06)-differentially private" in card and "Not covered: the weights" in card
    assert "- data.mean, data.std: the teacher's own normalisation, part of the model" in card


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


# --- review fixes: old seeded files, the header table, the normalisation's origin --------------------------------

def test_old_seeded_or_unlabelled_files_are_not_private(world, tmp_path, capsys, test_noise):
    """A header written with the old --noise-seed (noise_seed, no noise key), or a private header without the
    noise key, is NOT private in inspect's lines, dfkd inspect and the model card; a current one is."""
    from dfkd.privacy_report import describe, not_private
    out = tmp_path / "p.stats.safetensors"
    noise.INSECURE_TEST_NOISE_SEED = None  # a real (secure) file to start from
    assert main(["record", "--teacher", str(world.teacher), "--kinds", "top-layer", "--privacy", "1",
                 "--clip", "top-layer=3", "--out", str(out), "--quiet"]) == 0
    meta = load(out)
    assert not_private(meta.header["privacy"]) is None and "NOT private" not in "\n".join(describe(meta.header))
    for name, change in (("seeded", lambda p: p.pop("noise") and p.update(noise_seed=7)),
                         ("unlabelled", lambda p: p.pop("noise"))):
        h = json.loads(json.dumps(meta.header))
        change(h["privacy"])
        assert describe(h)[0].startswith("privacy: NOT private: ") and len(describe(h)) == 1, name
        old = dataclasses.replace(meta, header=h)
        path = save(old, tmp_path / f"{name}.stats.safetensors")
        capsys.readouterr()
        assert main(["inspect", str(path)]) == 0
        shown = capsys.readouterr().out
        assert "privacy: NOT private" in shown and "-differential privacy (the accountant" not in shown, name
        assert main(["publish", "--teacher", str(world.teacher), "--stats", str(path), "--out",
                     str(tmp_path / f"pub-{name}")]) == 0
        card = (tmp_path / f"pub-{name}" / "README.md").read_text()
        assert "**The statistics are NOT private**" in card and "-differentially private" not in card, name


def test_every_private_header_key_is_listed_in_the_readme_table(tmp_path, test_noise):
    """Every key path of a private file's header (every kind, chosen and given clip bounds, spectral fields,
    closed form, as dfkd record writes it) has a status in privacy_report.HEADER_FIELDS, and the README's
    privacy table names every one of those patterns: the table cannot drift from the code."""
    from dfkd.privacy_report import HEADER_FIELDS, field_status, key_paths
    from dfkd.recording import KINDS
    from tests.conftest import ROOT
    x, y = blobs(90)
    cfg = RecordConfig(kinds=tuple(KINDS), privacy=1.0, value_range=(0.0, 1.0),
                       clip=(("top-layer", 3.0),))
    meta = record(Tiny(), (x, y), cfg, info=INFO)
    meta.header["teacher"] = "tiny"  # as record_file writes it
    h = load(save(meta, tmp_path / "p.stats.safetensors")).header
    paths = set(key_paths(h))
    assert {"recorded_on.sample_bytes", "format", "version", "spectral.keep", "privacy.clip_bounds.top-layer.bound",
            "spectral.pairs[].kept"} <= paths
    assert [p for p in sorted(paths) if field_status(p) is None] == []
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| value in the file"):readme.index("The published folder's `config.json`")]
    assert [p for pats, _, _ in HEADER_FIELDS for p in pats if f"`{p}`" not in table] == []
    assert field_status("recorded_on.something_new") is None


def test_train_records_the_normalisation_origin_and_private_record_refuses_auto(idx_dir, tmp_path, capsys):
    """dfkd train writes where the normalisation came from into the model JSON (auto -> data, MEAN/STD -> user,
    none -> none); record --privacy refuses a teacher whose normalisation was computed from data, and an old
    file without the origin unless mean 0 / std 1; the exact mean and std never reach a private header."""
    from dfkd.privacy_report import check_inputs
    for norm, origin in (("auto", "data"), ("0.5/0.25", "user"), ("none", "none")):
        stem = tmp_path / f"t-{origin}"
        assert main(["train", "--model", "hinton-1200", "--model-args", '{"hidden": [4]}', "--data", f"idx:{idx_dir}",
                     "--normalize", norm, "--epochs", "1", "--out", str(tmp_path), "--name", stem.name,
                     "--quiet"]) == 0, norm
        desc = json.loads(stem.with_suffix(".json").read_text())
        assert desc["data"]["normalisation_origin"] == origin
    capsys.readouterr()
    code = main(["record", "--teacher", str(tmp_path / "t-data"), "--privacy", "1", "--range=-10,10",
                 "--out", str(tmp_path / "s.stats.safetensors"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("dfkd: --teacher:") and "MEAN/STD" in err, err
    assert not (tmp_path / "s.stats.safetensors").exists()
    assert main(["record", "--teacher", str(tmp_path / "t-user"), "--privacy", "1", "--kinds", "top-layer",
                 "--out", str(tmp_path / "u.stats.safetensors"), "--quiet"]) == 0
    ident, other = INFO, dataclasses.replace(INFO, mean=(0.13,), std=(0.31,))
    check_inputs({"normalisation": "model"}, False, ident)  # an old file, identity: nothing to leak
    for origin in ({"normalisation": "model"}, {"normalisation": "model", "model_normalisation": "data"}):
        with pytest.raises(DfkdError, match="retrain"):
            check_inputs(origin, False, other)
    check_inputs({"normalisation": "model", "model_normalisation": "user"}, False, other)


def test_declared_range_float32_and_format_fixed(world, tmp_path):
    """--range must be finite in float32 (the API's value_range too), and equal a format-fixed range."""
    from dfkd.data import declared_range
    with pytest.raises(DfkdError, match="finite in float32"):
        declared_range(INFO, (-1e300, 1e300))
    assert declared_range(INFO, (-3e38, 3e38)).high == 3e38
    cfg = RecordConfig(kinds=("top-layer",), value_range=(0.0, 255.0))
    with pytest.raises(DfkdError, match="fixed by its format"):
        record_file(ModelRef(str(world.teacher)), DataRef(), tmp_path / "s.stats.safetensors", cfg)
    record_file(ModelRef(str(world.teacher)), DataRef(), tmp_path / "s.stats.safetensors",
                dataclasses.replace(cfg, value_range=(0.0, 1.0)))
