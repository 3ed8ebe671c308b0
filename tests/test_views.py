"""The ``+backdrop`` view: procedural scenes made from no data, and the two blends, each checked by a closed
form on inputs chosen so that the blend can be read back."""
import math

import torch

from dfkd.views import augment, backdrop, backdrops, recolour


def test_backdrops_are_scenes_with_a_natural_spectrum_and_muted_colours():
    """In ``[0, 1]``; their radially averaged power falls with frequency as photographs' does (a slope between
    -3.5 and -1 in log-log, fitted in float64 between 2 and 12 cycles per image; white noise: 0); their three
    channels move together (a tint, not independent colours: the mean channel correlation above 0.5); and no
    image is one flat colour (more than 8 distinct colours at steps of 1/8)."""
    b = backdrops(256, 3, 32, 32, torch.Generator().manual_seed(0)).double()
    assert b.min() >= 0 and b.max() <= 1 and b.shape == (256, 3, 32, 32)
    power = torch.fft.fft2(b - b.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))
    f = torch.fft.fftfreq(32, 1 / 32).abs()
    radius = torch.maximum(f.view(-1, 1), f.view(1, -1)).round().long()  # rings of equal largest frequency
    ks = torch.arange(2, 13)
    ring = torch.stack([power[radius == k].mean() for k in ks])
    A = torch.stack([ks.double().log(), torch.ones(len(ks), dtype=torch.float64)], 1)
    slope = torch.linalg.lstsq(A, ring.log()[:, None]).solution[0].item()
    assert -3.5 < slope < -1, slope
    white = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wpower = torch.fft.fft2(white - white.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))
    wslope = torch.linalg.lstsq(A, torch.stack([wpower[radius == k].mean() for k in ks]).log()[:, None])
    assert abs(wslope.solution[0].item()) < 0.3  # the fit tells white noise from a scene
    flat = b.flatten(2)
    corr = [torch.corrcoef(flat[i])[[0, 0, 1], [1, 2, 2]].mean().item() for i in range(len(b))]
    assert sum(corr) / len(corr) > 0.5
    for i in range(0, 256, 32):
        assert len(torch.unique((b[i].flatten(1).T * 8).round(), dim=0)) > 8


def test_backdrop_leaves_half_unchanged_and_blends_the_rest_by_difference_or_weighted_mean():
    """Run twice with one seed, on an all-black and an all-white batch (raw range ``[-1, 2]``), the draws are
    the same, so each image reads back as one of three: unchanged (black stays -1, white stays 2); the
    difference ``lo + |x - b|`` (then the two outputs sum to ``lo + hi`` at every pixel); or the weighted
    mean ``w x + (1 - w) b`` (then white minus black is ``w (hi - lo)``, one ``w`` in ``[0.5, 0.9]`` for the
    whole image). About half are unchanged, a quarter each blended, and the backgrounds are not flat."""
    lo, hi, n = -1.0, 2.0, 400
    black, white = torch.full((n, 3, 16, 16), lo), torch.full((n, 3, 16, 16), hi)
    vb = backdrop(black, torch.Generator().manual_seed(3), lo, hi)
    vw = backdrop(white, torch.Generator().manual_seed(3), lo, hi)
    assert vb.min() >= lo and vw.max() <= hi
    kept = (vb == lo).flatten(1).all(1) & (vw == hi).flatten(1).all(1)
    diff = ((vb + vw - (lo + hi)).abs() < 1e-5).flatten(1).all(1) & ~kept
    w = (vw - vb) / (hi - lo)
    wmean = ((w - w.flatten(1).mean(1).view(-1, 1, 1, 1)).abs() < 1e-5).flatten(1).all(1) & ~kept & ~diff
    assert (kept | diff | wmean).all()
    ws = w.flatten(1).mean(1)[wmean]
    assert ws.min() >= 0.5 - 1e-5 and ws.max() <= 0.9 + 1e-5 and ws.max() - ws.min() > 0.3
    assert 0.4 < kept.float().mean() < 0.6 and 0.17 < diff.float().mean() < 0.33 and 0.17 < wmean.float().mean() < 0.33
    assert vb[diff].std((2, 3)).mean() > 0.1 * (hi - lo)  # under a black image the scene itself shows


def test_backdrop_comes_last_and_is_reproducible():
    """``affine+cutmix+colour+backdrop`` is ``affine+cutmix+colour`` then ``backdrop`` with the generator
    carried on; one seed gives one batch; vectors pass through untouched."""
    x = torch.rand(16, 3, 16, 16)
    got = augment(x, "affine+cutmix+colour+backdrop", torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(got, backdrop(recolour(augment(x, "affine+cutmix", g), g), g))
    assert torch.equal(got, augment(x, "affine+cutmix+colour+backdrop", torch.Generator().manual_seed(5)))
    v = torch.rand(8, 20)
    assert torch.equal(augment(v, "none+backdrop", torch.Generator().manual_seed(0)), v)
    assert not math.isclose((got - augment(x, "affine+cutmix+colour", torch.Generator().manual_seed(5))).abs().max(), 0)


def test_shift_and_affine_fill_the_uncovered_edge_with_the_ranges_black():
    """A batch that is black everywhere stays black under every shift and affine view, for a range whose black is
    not zero (-1..1): the edge a view uncovers is filled with ``lo``; bright images gain exactly ``lo`` there."""
    for lo in (-1.0, 0.0):
        black = torch.full((6, 3, 16, 16), lo)
        for how in ("shift", "affine"):
            for seed in range(4):  # shift's one offset per batch is (0, 0) with chance 1/25: four draws
                out = augment(black, how, torch.Generator().manual_seed(seed), lo=lo, hi=1.0)
                assert torch.allclose(out, black, atol=1e-6), (lo, how, seed)
    white = torch.ones(6, 3, 16, 16)
    moved = [augment(white, "shift", torch.Generator().manual_seed(s), lo=-1.0) for s in range(4)]
    assert any((m == -1.0).any() for m in moved) and all(((m == 1.0) | (m == -1.0)).all() for m in moved)
