"""The Fourier basis of reconstruction (``dfkd.basis``): its images against a closed form, its start, and
reconstruction in it against plain Adam on the coefficients."""
import json
import math
from dataclasses import replace

import pytest
import torch

import dfkd.reconstruction as rec
from dfkd.basis import COLOUR, Fourier, colour_matrix, spectrum_scale
from dfkd.config import ReconstructConfig
from dfkd.data import DataInfo
from dfkd.errors import DfkdError
from dfkd.generation import generate
from dfkd.losses import prior
from tests.test_reconstruct import TOY_INFOS, _CrossEntropy, toy_start, toy_teacher


def test_spectrum_scale_is_one_over_f_with_rms_one():
    s = spectrum_scale(8, 10, decay=1.0).double()
    assert s.shape == (8, 6) and math.isclose(float(s.pow(2).mean()), 1.0, rel_tol=1e-6)
    f = lambda ky, kx: math.hypot(min(ky, 8 - ky) / 8, kx / 10)  # noqa: E731  cycles per pixel
    for (ky, kx), (qy, qx) in (((1, 0), (0, 3)), ((2, 2), (4, 5)), ((7, 1), (3, 4))):
        assert math.isclose(float(s[ky, kx] / s[qy, qx]), f(qy, qx) / f(ky, kx), rel_tol=1e-5)
    assert math.isclose(float(s[0, 0]), float(s[0, 1]), rel_tol=1e-6)  # the DC term weighs as the lowest frequency


@pytest.mark.parametrize("h,w,ky,kx,part", [(8, 8, 0, 1, 0), (8, 8, 1, 2, 1), (8, 8, 3, 1, 0), (8, 8, 6, 3, 1),
                                             (6, 9, 2, 4, 0), (6, 9, 5, 1, 1)])
def test_one_coefficient_is_a_wave_through_the_colour_matrix(h, w, ky, kx, part):
    """An interior column's coefficient a (real part) or b (imaginary part) on channel j adds
    s * 2 / sqrt(HW) * (a cos(t) - b sin(t)), t = 2 pi (ky y / H + kx x / W), times M[:, j] to every channel: the
    closed form, in float64, with no FFT; on a square image and on a non-square one of odd width."""
    z0 = torch.randn((1, 3, h, w), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    four = Fourier(z0)
    assert torch.equal(four.image(), z0)  # zero coefficients: the start itself
    with torch.no_grad():
        four.coef[0, 1, ky, kx, part] = 0.7
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    t = 2 * math.pi * (ky * y / h + kx * x / w)
    wave = 0.7 * float(four.scale[ky, kx]) * 2 / math.sqrt(h * w) * (torch.cos(t) if part == 0 else -torch.sin(t))
    m = torch.tensor(COLOUR, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    want = z0 + m[:, 1].view(1, 3, 1, 1) * wave
    assert torch.allclose(four.image().detach(), want, atol=1e-12)
    assert torch.equal(colour_matrix(1), torch.eye(1))


def test_reconstruction_in_the_fourier_basis_is_adam_on_the_coefficients():
    """optimise_batch with basis fourier: the start the pixel basis starts from, then Adam (lr) on the coefficients
    of the change, the image clamped to the raw range as the network sees it. The oracle: that loop written out
    here, on the normalised start, for one std and three different ones; the inputs stay in range and move."""
    teacher = toy_teacher()
    cfg = ReconstructConfig(n=6, batch_size=6, steps=25, lr=0.05, tv=0.3, l2=0.01, jitter=0, basis="fourier")
    labels = torch.arange(6) % 5
    for info in TOY_INFOS:
        got, losses = rec.optimise_batch(teacher, _CrossEntropy(None, teacher, cfg), labels, cfg,
                                         torch.Generator().manual_seed(1), info)
        start = toy_start()
        z0 = info.to_model(start)
        coef = torch.zeros((6, 3, 8, 5, 2), requires_grad=True)
        s, m = spectrum_scale(8, 8).float(), colour_matrix(3)
        opt = torch.optim.Adam([coef], lr=cfg.lr)

        def image():
            d = torch.fft.irfft2(torch.view_as_complex(coef) * s, s=(8, 8), norm="ortho")
            return info.to_raw(z0 + torch.einsum("ij,njhw->nihw", m, d)).clamp(0, 1)
        for _ in range(cfg.steps):
            xn = info.to_model(image())
            loss = torch.nn.functional.cross_entropy(teacher(xn), labels, reduction="sum") + prior(xn, cfg.tv, cfg.l2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        want = image().detach()
        assert got.min() >= 0 and got.max() <= 1 and (got - start).abs().max() > 0.05
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        assert losses[1] < losses[0]
    # both bases start from the same inputs: their first steps' losses are one value
    first = [rec.optimise_batch(teacher, _CrossEntropy(None, teacher, c), labels, c, torch.Generator().manual_seed(1),
                                info)[1][0] for c in (cfg, replace(cfg, basis="pixel"))]
    assert math.isclose(first[0], first[1], rel_tol=1e-6), first


def test_the_basis_is_saved_only_where_it_is_not_the_pixels(teacher, meta, tmp_path):
    """A set made before the basis existed resumes (its config had no basis: the pixel default is left out); one
    made in the Fourier basis says so, is deterministic, and is refused for vectors and by a generator."""
    from dfkd.config import to_dict
    assert "basis" not in to_dict(ReconstructConfig()) and to_dict(ReconstructConfig(basis="fourier"))["basis"] == "fourier"
    cfg = ReconstructConfig(objective="all-layers", n=20, batch_size=10, steps=5, jitter=1, basis="fourier")
    a, b = rec.reconstruct(teacher, meta, tmp_path / "a", cfg), rec.reconstruct(teacher, meta, tmp_path / "b", cfg)
    shards = [sorted(x.parent.glob("shard-*")) for x in (a, b)]
    assert len(shards[0]) == 2 and [p.read_bytes() for p in shards[0]] == [p.read_bytes() for p in shards[1]]
    assert json.loads((a.parent / "manifest.json").read_text())["config"]["basis"] == "fourier"
    pix = rec.reconstruct(teacher, meta, tmp_path / "p", replace(cfg, basis="pixel"))
    assert "basis" not in json.loads((pix.parent / "manifest.json").read_text())["config"]  # as before the basis
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in pix.parent.glob("shard-*")}
    assert len(before) == 2 and before[shards[0][0].name][0] != shards[0][0].read_bytes()  # the pixels' own inputs
    rec.reconstruct(teacher, meta, tmp_path / "p", replace(cfg, basis="pixel"))  # resumed: finished, kept as it is
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in pix.parent.glob("shard-*")} == before
    vec = DataInfo(shape=(12,), num_classes=3)
    with pytest.raises(DfkdError, match="basis"):
        rec.reconstruct(torch.nn.Linear(12, 3), None, tmp_path / "v", ReconstructConfig(objective="bn-stats", basis="fourier"), vec)
    with pytest.raises(DfkdError, match="basis"):
        generate(teacher, None, torch.nn.Linear(1, 1), vec, rc=ReconstructConfig(objective="bn-stats", basis="fourier"))
