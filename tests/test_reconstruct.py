"""Reconstruction: deterministic shards, resume after a kill, NaN handling, bad settings, the
teacher's input space honoured, and the synthetic set read back."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

import dfkd.reconstruction as rec
from dfkd.config import ReconstructConfig
from dfkd.data import DataInfo, at_input
from dfkd.errors import DfkdError
from dfkd.files import load_tensors, read_json, write_json
from dfkd.objectives import make_objective
from dfkd.losses import check_seams, patch_seams, prior, seam_prior, total_variation
from dfkd.images import class_grid
from dfkd.reconstruction import reconstruct
from dfkd.synthetic import SyntheticSet

CFG = ReconstructConfig(objective="all-layers", n=30, batch_size=10, steps=8, jitter=1)


def _shards(d):
    return [load_tensors(d / s["file"])[0] for s in read_json(d / "manifest.json")["shards"]]


def _load(d):
    return SyntheticSet(d).open().load()


def test_same_seed_same_shards_and_balanced(teacher, meta, tmp_path):
    reconstruct(teacher, meta, tmp_path / "a", CFG)
    reconstruct(teacher, meta, tmp_path / "b", CFG)
    a, b = _shards(tmp_path / "a"), _shards(tmp_path / "b")
    assert len(a) == len(b) == 3  # 30 inputs in batches of 10
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, labels, logits = _load(tmp_path / "a")
    assert x.shape == (30, 1, 32, 32) and labels.bincount().tolist() == [3] * 10
    assert 0 <= x.min() and x.max() <= 1
    m = read_json(tmp_path / "a" / "manifest.json")
    assert m["complete"] and m["image_steps"] == 30 * 8 and m["data"]["shape"] == [1, 32, 32]
    assert all(s["loss_last"] < s["loss_first"] for s in m["shards"])
    reconstruct(teacher, meta, tmp_path / "c", replace(CFG, seed=1))
    assert not torch.equal(_load(tmp_path / "c")[0], x)


def test_sample_grid_is_the_class_grid(teacher, meta, tmp_path):
    from PIL import Image
    reconstruct(teacher, meta, tmp_path / "a", CFG)
    x, labels, _ = _load(tmp_path / "a")  # 30 inputs: all of them fit in the grid's ten a class
    png = np.array(Image.open(tmp_path / "a" / "samples.png"))
    assert np.array_equal(png, class_grid(x, labels))
    assert png.shape == (10 * 34 * 2 + 4, 10 * 34 * 2 + 4)


def test_kill_and_resume_equals_uninterrupted(teacher, meta, tmp_path, monkeypatch):
    reconstruct(teacher, meta, tmp_path / "whole", CFG)
    real, calls = rec.optimise_batch, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rec, "optimise_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(teacher, meta, tmp_path / "resumed", CFG)
    m = read_json(tmp_path / "resumed" / "manifest.json")
    assert [s["index"] for s in m["shards"]] == [0] and not m["complete"]
    with pytest.raises(DfkdError, match="incomplete"):
        _load(tmp_path / "resumed")
    monkeypatch.setattr(rec, "optimise_batch", real)
    reconstruct(teacher, meta, tmp_path / "resumed", CFG)
    whole, resumed = _shards(tmp_path / "whole"), _shards(tmp_path / "resumed")
    assert len(whole) == len(resumed) == 3  # the resumed run finished the set, not only its first shard
    for sa, sb in zip(whole, resumed):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_loss_stops_with_a_clear_error_and_keeps_shards(teacher, meta, tmp_path, monkeypatch):
    from dfkd.objectives import AllLayers
    real, seen = AllLayers.loss, []

    def nan_in_second_batch(self, *args):
        seen.append(1)
        out = real(self, *args)
        return out * float("nan") if len(seen) > CFG.steps else out

    monkeypatch.setattr(AllLayers, "loss", nan_in_second_batch)
    with pytest.raises(DfkdError, match="loss became nan at step 0; finished shards are kept"):
        reconstruct(teacher, meta, tmp_path / "n", CFG)
    assert [s["index"] for s in read_json(tmp_path / "n" / "manifest.json")["shards"]] == [0]


def test_other_settings_in_the_same_directory_are_refused(teacher, meta, tmp_path):
    reconstruct(teacher, meta, tmp_path / "d", CFG)
    with pytest.raises(DfkdError, match="other settings"):
        reconstruct(teacher, meta, tmp_path / "d", replace(CFG, steps=9))


def test_noise_baseline_needs_no_stats_nor_attributes(teacher, small, tmp_path):
    """The class count comes from the model's output, the shape and range from the data description."""
    reconstruct(teacher, None, tmp_path / "z", ReconstructConfig(objective="noise", n=20, batch_size=20), small.info)
    x, labels, _ = _load(tmp_path / "z")
    assert abs(x.mean().item() - 0.15) < 0.01 and labels.tolist() == [i % 10 for i in range(20)]
    with pytest.raises(DfkdError, match="give the data description"):
        reconstruct(teacher, None, tmp_path / "y", ReconstructConfig(objective="noise"))


def test_inputs_are_raw_and_the_teacher_sees_them_normalised(teacher, meta, tmp_path):
    """With mean/std normalisation the start is N(0.15, 0.1) in raw values, the clamp is the raw range
    [0, 1], and the set stores raw values (the teacher sees them mapped into its space)."""
    info = replace(meta.data, mean=(0.5,), std=(0.25,))
    meta.header["data"] = info.as_dict()
    try:
        reconstruct(teacher, meta, tmp_path / "n", replace(CFG, lr=0.5))
        z = reconstruct(teacher, None, tmp_path / "z", ReconstructConfig(objective="noise", n=10, batch_size=10), info)
    finally:
        meta.header["data"] = replace(info, mean=(0.0,), std=(1.0,)).as_dict()
    x, _, logits = _load(tmp_path / "n")
    with torch.no_grad():  # the stored logits are the teacher's on the normalised view of the raw inputs
        assert torch.allclose(logits, teacher(info.to_model(x)), atol=1e-5)
    x = info.to_model(x)  # stored raw: the teacher's view of it
    assert x.min() >= -2 - 1e-6 and x.max() <= 2 + 1e-6 and (x <= -2 + 1e-6).any()  # raw 0 is -2 here
    xz, _, _ = _load(z.parent)
    raw = xz  # stored raw
    assert abs(raw.mean().item() - 0.15) < 0.01 and abs(raw.std().item() - 0.1) < 0.01


def test_malformed_manifests_are_one_line(tmp_path, teacher, meta):
    reconstruct(teacher, meta, tmp_path / "s", CFG)
    m = read_json(tmp_path / "s" / "manifest.json")
    for bad in ({k: v for k, v in m.items() if k != "shards"}, dict(m, shards="x"),
                dict(m, shards=[dict(m["shards"][0], file="../../etc/passwd")])):
        write_json(tmp_path / "s" / "manifest.json", bad)
        with pytest.raises(DfkdError, match="shards list is missing or malformed"):
            SyntheticSet(tmp_path / "s").open()
    with pytest.raises(DfkdError, match="not a synthetic set folder"):
        SyntheticSet(tmp_path / "nothing").open()


def test_vectors_as_inputs(tmp_path):
    """A non-image model (an MLP on 7 features) reconstructs too: no jitter or TV on vectors."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    info = DataInfo((7,), 3, low=-3.0, high=3.0)
    from dfkd.config import RecordConfig
    from dfkd.recording import record
    x, y = torch.randn(600, 7), torch.arange(600) % 3
    meta = record(net, (x, y), RecordConfig(), info)
    reconstruct(net, meta, tmp_path / "v", ReconstructConfig(objective="all-layers", n=30, batch_size=15, steps=20,
                                                             jitter=2, tv=0.1))
    xs, _, _ = _load(tmp_path / "v")
    assert xs.shape == (30, 7) and xs.min() >= -3 and xs.max() <= 3


class _CrossEntropy(rec.Objective):
    """The teacher's cross-entropy on the intended labels: an objective with no statistics."""
    name, kind = "ce", None

    def loss(self, logits, acts, tg, labels):
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def toy_teacher() -> torch.nn.Module:
    """A frozen conv net on 3 x 8 x 8 inputs, 5 classes (seeded)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 6 * 6, 5)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# the toy teacher's inputs: one std for every channel, and three different ones
TOY_INFOS = [DataInfo(shape=(3, 8, 8), num_classes=5, mean=m, std=s) for m, s in (((0.5,), (0.25,)),
                                                                                   ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))]


def toy_start() -> torch.Tensor:
    """The raw start ``optimise_batch`` draws for six toy inputs from a generator seeded 1 (noise init, clamped)."""
    return (0.15 + 0.1 * torch.randn((6, 3, 8, 8), generator=torch.Generator().manual_seed(1))).clamp(0, 1)


def test_raw_inputs_take_the_steps_adam_takes_in_the_networks_space():
    """One input space: inputs are optimised raw, with per-channel lr x std, and the network (and the
    priors) see them normalised, with Adam's eps scaled as the gradient is. The oracle is plain Adam run on the normalised inputs with ``lr``,
    clamped to the raw range mapped into the network's space: the two must end at the same inputs, for
    one std and for three different ones."""
    teacher = toy_teacher()
    cfg = ReconstructConfig(n=6, batch_size=6, steps=25, lr=0.05, tv=0.3, l2=0.01, jitter=0, patch_tv=0.5, patch=4)
    labels = torch.arange(6) % 5
    for info in TOY_INFOS:
        got, _ = rec.optimise_batch(teacher, _CrossEntropy(None, teacher, cfg), labels, cfg,
                                    torch.Generator().manual_seed(1), info)
        start = toy_start()
        x = info.to_model(start).requires_grad_(True)
        lo, hi = info.to_model(torch.zeros(1, 3, 8, 8)), info.to_model(torch.ones(1, 3, 8, 8))
        opt = torch.optim.Adam([x], lr=cfg.lr)
        for _ in range(cfg.steps):
            loss = torch.nn.functional.cross_entropy(teacher(x), labels, reduction="sum") + prior(x, cfg.tv, cfg.l2) \
                + seam_prior(x, cfg.patch_tv, cfg.patch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        want = info.to_raw(x.detach())
        assert got.min() >= 0 and got.max() <= 1 and (got - start).abs().max() > 0.05  # raw, and it moved
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 4), ((3, 2, 10, 7), 3), ((1, 1, 4, 9), 4), ((2, 3, 5, 6), 1)])
def test_patch_seams_is_total_variation_across_the_patch_grid_only(shape, p):
    """The seam prior against a loop over every pair of neighbouring pixels in float64: a pair counts where its
    two pixels fall in different patches of side ``p`` from the top left corner; rows and columns are each
    averaged over their pairs and channels, then added. A picture constant in each patch has no other edges,
    so there its seams are its whole total variation, and refusals name the flag at fault."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    n, c, h, w = shape
    for i in range(n):
        rows = [abs(x[i, k, r + 1, q] - x[i, k, r, q]) for k in range(c) for r in range(h - 1) for q in range(w)
                if (r + 1) // p != r // p]
        cols = [abs(x[i, k, r, q + 1] - x[i, k, r, q]) for k in range(c) for r in range(h) for q in range(w - 1)
                if (q + 1) // p != q // p]
        want = (sum(rows) / len(rows) if rows else 0) + (sum(cols) / len(cols) if cols else 0)
        assert patch_seams(x, p)[i].item() == pytest.approx(float(want), rel=1e-12)
        if p == 1:  # every pair crosses a seam: the plain total variation
            assert total_variation(x)[i].item() == pytest.approx(float(want), rel=1e-12)
    blocks = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    flat = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3)  # 12 x 12 in 4 x 4 patches
    assert torch.allclose(patch_seams(flat, 4) * 2 / 11, total_variation(flat))  # 2 of 11 pairs a line cross seams
    assert (patch_seams(flat, 4) > 0).all() and (patch_seams(flat, 3) != patch_seams(flat, 4)).all()
    for args, where, problem in (((0.1, 1), "patch", "--patch-tv 0.1 needs the patches' side"),
                                 ((float("nan"), 4), "patch_tv", "nan is not a finite weight"),
                                 ((0.1, 4.0), "patch", "4.0 is not a whole number"),
                                 ((0.0, 4), "patch", "--patch 4 does nothing without a --patch-tv")):
        with pytest.raises(DfkdError, match=problem) as e:
            check_seams(*args)
        assert e.value.where == where
    check_seams(0.1, 4)
    check_seams(0.0, 0)


def test_a_set_of_the_old_format_is_refused_in_one_line(teacher, meta, tmp_path):
    """Format 1 sets held normalised inputs: reading one, or resuming into one, is refused naming the format
    and the remedy, and --restart makes it again; a set of a newer format points to the dfkd that made it."""
    reconstruct(teacher, meta, tmp_path / "s", CFG)
    m = read_json(tmp_path / "s" / "manifest.json")
    assert m["format"] == 2
    del m["format"]
    write_json(tmp_path / "s" / "manifest.json", m)
    with pytest.raises(DfkdError, match=r"format 1 \(normalised inputs\); this dfkd reads format 2 .*--restart"):
        SyntheticSet(tmp_path / "s").open()
    with pytest.raises(DfkdError, match=r"format 1 \(normalised inputs\); .*rerun with --restart to make it again"):
        reconstruct(teacher, meta, tmp_path / "s", CFG)
    reconstruct(teacher, meta, tmp_path / "s", CFG, restart=True)
    assert len(SyntheticSet(tmp_path / "s").open().load()[0]) == 30
    write_json(tmp_path / "s" / "manifest.json", dict(read_json(tmp_path / "s" / "manifest.json"), format=3))
    with pytest.raises(DfkdError, match="format 3; this dfkd reads format 2 .*newer dfkd"):
        SyntheticSet(tmp_path / "s").open()



def _channel_fit(src, dst):
    """Least squares ``dst ~ a * src + b`` in float64 over the pixels ``dst`` holds inside (0, 1) (not clamped):
    ``a``, ``b`` and the largest residual."""
    keep = (dst > 1e-6) & (dst < 1 - 1e-6)
    A = torch.stack([src[keep].double(), torch.ones(int(keep.sum()), dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(A, dst[keep].double()[:, None]).solution.flatten()
    return sol[0].item(), sol[1].item(), (A @ sol - dst[keep].double()).abs().max().item()


def test_the_teacher_sees_the_inputs_under_views_drawn_anew_each_step(teacher, meta, tmp_path):
    """``views="none+colour"``, Adam's lr so small that the stored inputs are their start (to 1e-6): what the
    teacher is given at each step (read by a hook) is, per input, the stored input under a gain in [0.6, 1.4]
    and an offset within +-0.1 (fitted in float64 where unclamped), gains that differ input to input and step
    to step; ``none`` gives it the inputs themselves; an unknown view, or one that mixes inputs, is refused."""
    seen = []
    hook = teacher.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        cfg = replace(CFG, n=10, batch_size=10, steps=2, lr=1e-9, jitter=0)
        for views in ("none", "none+colour"):
            seen.clear()
            reconstruct(teacher, meta, tmp_path / views, replace(cfg, views=views))
            x = meta.data.to_model(_load(tmp_path / views)[0])  # raw [0, 1] is the teacher's [0, 1] here
            steps = [s for s in seen if len(s) == 10]  # after the probes of its shape: two steps, the logits' pass
            assert len(steps) == 3
            steps = steps[:2]
            config = read_json(tmp_path / views / "manifest.json")["config"]
            assert config.get("views") == (None if views == "none" else views)  # a set made before views matches
            if views == "none":
                assert all((s - x).abs().max() < 1e-6 for s in steps)
                continue
            gains = [[_channel_fit(x[i, 0], s[i, 0]) for i in range(len(x))] for s in steps]
            for a, b, res in gains[0] + gains[1]:
                assert res < 1e-5 and 0.6 - 1e-5 <= a <= 1.4 + 1e-5 and abs(b) <= 0.1 + 1e-5
            assert len({round(a, 4) for a, _, _ in gains[0]}) == 10  # each input its own
            assert all(abs(p[0] - q[0]) > 1e-4 for p, q in zip(gains[0], gains[1]))  # drawn anew each step
    finally:
        hook.remove()
    # affine views (each input its own warp) at a working lr: one seed gives one set, and another than none's
    for name in ("affine-a", "affine-b"):
        reconstruct(teacher, meta, tmp_path / name, replace(CFG, n=10, batch_size=10, steps=3, views="affine"))
    a, b = _shards(tmp_path / "affine-a"), _shards(tmp_path / "affine-b")
    assert all(torch.equal(sa[k], sb[k]) for sa, sb in zip(a, b) for k in sa)
    reconstruct(teacher, meta, tmp_path / "plain", replace(CFG, n=10, batch_size=10, steps=3))
    assert not torch.equal(_load(tmp_path / "plain")[0], _load(tmp_path / "affine-a")[0])
    for bad in ("warp", "affine+cutmix", "none+mix+colour"):
        with pytest.raises(DfkdError, match="views: .* is not shift, affine or none"):
            reconstruct(teacher, meta, tmp_path / "bad", replace(CFG, views=bad))


def test_ce_adds_the_intended_classes_cross_entropy_per_input(teacher, meta):
    """``ce`` adds w x the cross-entropy of the teacher's logits to each input's intended class, per input: the first
    step's loss with it less the one without equals w x that cross-entropy at the start, computed in float64 from a
    copy of the teacher (no views, jitter or priors, so the first step sees the start as it is). The losses are float32
    means of about 2e4 an input here, so their difference is compared to within their rounding (16 float32 ulps of the
    larger: about 0.04, under 1% of the term); a tolerance below one ulp passed or failed with the machine's kernels."""
    cfg = ReconstructConfig(objective="all-layers", batch_size=20, steps=2, lr=0.05)
    labels = torch.arange(20) % 10
    obj = make_objective("all-layers", meta, teacher, cfg)
    start, _ = rec.optimise_batch(teacher, obj, labels, replace(cfg, steps=0), torch.Generator().manual_seed(3), meta.data)
    first = [rec.optimise_batch(teacher, obj, labels, replace(cfg, ce=w), torch.Generator().manual_seed(3),
                                meta.data)[1][0] for w in (0.0, 2.5)]
    t64 = at_input(copy.deepcopy(teacher).double().eval(), meta.data)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(t64(start.double()), labels).item()
    tol = 16 * torch.finfo(torch.float32).eps * max(abs(v) for v in first)
    assert tol < 0.01 * 2.5 * ce and ce > 0.1  # the check still tells w x the term from anything else
    assert first[1] - first[0] == pytest.approx(2.5 * ce, abs=tol)


def test_ce_must_be_finite_and_not_negative(teacher, meta, tmp_path):
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(DfkdError, match="cross-entropy weight"):
            reconstruct(teacher, meta, tmp_path / "r", replace(CFG, ce=w))
