"""Distillation: the KD loss against its formula; a student from synthetic data beats noise;
augmentation in the raw range; the synthetic set streamed from its shards."""
import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from dfkd.config import DistillConfig, ReconstructConfig
from dfkd.distillation import check_views, distill
from dfkd.errors import DfkdError
from dfkd.losses import kd_loss
from dfkd.views import augment, recolour
from dfkd.models import build_model
from dfkd.reconstruction import reconstruct
from dfkd.synthetic import SyntheticSet


def test_kd_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g) * 3
    T = 8.0
    p = torch.softmax(t.double() / T, 1)
    q = torch.softmax(s.double() / T, 1)
    oracle = (p * (p.log() - q.log())).sum(1).mean() * T * T
    assert abs(kd_loss(s, t, T).item() - oracle.item()) < 1e-5
    assert kd_loss(t, t, T).abs().item() < 1e-6


def _student(synth, teacher, small, epochs=30):
    torch.manual_seed(0)
    st, _ = build_model("lenet5-half", small.info)
    hist = distill(st, synth, teacher, DistillConfig(epochs=epochs, eval_every=epochs), small.test)
    return hist[-1]["test_accuracy"]


def test_synthetic_student_beats_noise_baseline(teacher, meta, small, tmp_path):
    cfg = ReconstructConfig(objective="all-layers", n=500, batch_size=250, steps=100)
    reconstruct(teacher, meta, tmp_path / "al", cfg)
    reconstruct(teacher, None, tmp_path / "nz", replace(cfg, objective="noise"), small.info)
    acc = _student(SyntheticSet(tmp_path / "al").open(), teacher, small)
    noise = _student(SyntheticSet(tmp_path / "nz").open(), teacher, small)
    print(f"all-layers student {acc:.3f}, noise student {noise:.3f}")
    assert acc > noise + 0.30
    assert acc > 0.6


def test_streamed_shards_equal_the_set_in_memory(teacher, meta, small, tmp_path):
    """An epoch over the shards sees every input once, and a student distilled from the stream
    equals one distilled from the same set's tensors in memory in the same order."""
    reconstruct(teacher, meta, tmp_path / "s", ReconstructConfig(objective="top-layer", n=60, batch_size=20, steps=3))
    synth = SyntheticSet(tmp_path / "s").open()
    stream = synth.dataset()
    order = stream.epoch_order(torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(60))
    x, _, logits = synth.load()
    xb, lb = stream.batch(order[:25])
    assert torch.equal(xb, x[order[:25]]) and torch.equal(lb, logits[order[:25]])

    class InMemory(torch.utils.data.Dataset):
        def __len__(self):
            return 60

        def epoch_order(self, g):
            return stream.epoch_order(g)

        def batch(self, idx):
            return x[idx], logits[idx]

    cfg = DistillConfig(epochs=2, batch_size=16, augment="none")
    a, b = build_model("lenet5-half", small.info)[0], build_model("lenet5-half", small.info)[0]
    b.load_state_dict(a.state_dict())
    distill(a, synth, None, cfg)
    distill(b, InMemory(), None, cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_affine_augment_is_seeded_per_sample_and_keeps_digits(teacher, small):
    x = small.test[0][:200]
    a1 = augment(x, "affine", torch.Generator().manual_seed(3))
    a2 = augment(x, "affine", torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and a1.shape == x.shape
    assert not torch.equal(a1, augment(x, "affine", torch.Generator().manual_seed(4)))
    assert 0 <= a1.min() and a1.max() <= 1 + 1e-6
    moved = (a1 - x).abs().flatten(1).sum(1)
    assert (moved > 0).float().mean() > 0.95  # every sample gets its own transform
    with torch.no_grad():  # small rotations and shifts keep the digit: the teacher still reads it
        acc = (teacher(a1).argmax(1) == small.test[1][:200]).float().mean().item()
        base = (teacher(x).argmax(1) == small.test[1][:200]).float().mean().item()
    assert acc > 0.8 and base > 0.9, (acc, base)  # (this small teacher never saw an augmented digit)


def test_augmentation_fills_with_black_in_any_normalisation(small):
    """Views are made in the raw range: with mean/std normalisation the border the teacher sees
    after a shift is the model-space value of raw 0 (-2 here), not 0."""
    info = replace(small.info, mean=(0.5,), std=(0.25,))
    x = torch.ones(8, 1, 32, 32)  # all-white raw images: 2.0 in the model's space
    seen = []

    class Teacher(torch.nn.Module):
        def forward(self, v):
            seen.append(v)
            return torch.zeros(len(v), 10)

    st, _ = build_model("lenet5-half", small.info)
    distill(st, (x, torch.zeros(8, 10)), Teacher(), DistillConfig(epochs=3, batch_size=8, augment="affine"), info=info)
    views = torch.cat(seen)
    assert views.min() >= -2 - 1e-5 and views.max() <= 2 + 1e-5
    assert ((views + 2).abs() < 1e-5).any() and ((views - 2).abs() < 1e-5).any()
    assert not ((views.abs() < 1e-6).float().mean() > 0.01)  # no zero (raw 0.5) fill


def test_shift_then_cutmix_pastes_a_box_of_the_shifted_partner():
    """``shift+cutmix`` (accepted since the accepted values are derived from their parts): every
    pixel of a view is its own shifted image's or its partner's in the reversed batch, the partner's
    pixels form one axis-aligned box, and the shift is the whole batch's (zero-filled border)."""
    x = torch.rand(6, 3, 16, 16) + 0.5  # no zero pixel: the shift's border is the only black
    v = augment(x, "shift+cutmix", torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()  # the shift's draw, as ``augment`` makes it
    shifted = torch.nn.functional.pad(x, (2, 2, 2, 2))[:, :, dy:dy + 16, dx:dx + 16]
    own, partner = (v == shifted).all(1), (v == shifted.flip(0)).all(1)
    assert (own | partner).all() and (~own).any()
    for p in partner & ~own:  # the partner's pixels (where the two differ) lie in one box
        rows, cols = p.any(1).nonzero().flatten(), p.any(0).nonzero().flatten()
        if len(rows):
            box = torch.zeros_like(p)
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert not (p & ~box).any()
    assert dx != 2 or dy != 2  # this seed shifts, so the oracle above saw a real shift


def test_a_source_split_is_normalised_by_its_own_description_and_the_teacher_keeps_its_mode(colour_dir):
    """One input space through the API: a source's split (or a DataLoader over it) carries its DataInfo, so
    record and distill normalise it as they do the DataSource itself; distill leaves the teacher in the
    mode it was in."""
    from torch.utils.data import DataLoader

    from dfkd.config import RecordConfig
    from dfkd.recording import record
    from dfkd.sources import open_data
    data = open_data(f"folder:{colour_dir}", normalize="auto")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                  torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 10)).eval()
    cfg = RecordConfig(kinds=("top-layer",))
    whole, split = record(teacher, data, cfg), record(teacher, DataLoader(data.train, batch_size=300), cfg)
    assert torch.allclose(whole.get("top-layer", "mean"), split.get("top-layer", "mean"), atol=1e-5)
    raw = record(teacher, DataLoader(torch.utils.data.TensorDataset(*data.train.batch(torch.arange(1200))),
                                     batch_size=300), cfg)  # plain tensors: taken as they are, not normalised
    assert not torch.allclose(whole.get("top-layer", "mean"), raw.get("top-layer", "mean"), atol=1e-3)
    st = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    distill(st, data.train, teacher, DistillConfig(epochs=1, batch_size=32), test=data.test)
    assert not teacher.training


def _affine_fit(src: torch.Tensor, dst: torch.Tensor) -> tuple[float, float, float]:
    """Least squares ``dst ~ a * src + b`` in float64 (``torch.linalg.lstsq``): ``a``, ``b`` and the largest
    residual."""
    A = torch.stack([src.flatten().double(), torch.ones(src.numel(), dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(A, dst.flatten().double()[:, None]).solution.flatten()
    return sol[0].item(), sol[1].item(), (A @ sol - dst.flatten().double()).abs().max().item()


def test_colour_views_reorder_scale_and_shift_each_images_channels():
    """``+colour``: each output channel of an image is one of its input channels under its own gain
    (0.6..1.4) and offset (+-10 % of the range: +-0.6 for the raw range [-2, 4]), the channels in some order;
    fitted per channel by least squares on images whose three channels differ and stay unclamped (inputs
    1.2..1.6, outputs 0.12..2.84). The gains and offsets fill their intervals and differ image to image."""
    g = torch.Generator().manual_seed(0)
    n, ramp = 300, torch.linspace(0, 1, 16 * 16).view(16, 16)
    x = torch.stack([1.2 + 0.4 * ramp, 1.2 + 0.4 * ramp.T, 1.2 + 0.4 * ramp.flip(0)]).expand(n, 3, 16, 16).clone()
    v = augment(x, "none+colour", g, lo=-2.0, hi=4.0)
    assert torch.equal(v, augment(x, "none+colour", torch.Generator().manual_seed(0), lo=-2.0, hi=4.0))
    orders, gains, offsets = set(), [], []
    for k in range(n):
        order = []
        for c in range(3):
            fits = [_affine_fit(x[k, s], v[k, c]) for s in range(3)]
            s = min(range(3), key=lambda i: fits[i][2])
            a, b, res = fits[s]
            assert res < 1e-5 and 0.6 - 1e-5 <= a <= 1.4 + 1e-5 and abs(b) <= 0.6 + 1e-5, (k, c, fits)
            order.append(s)
            gains.append(a)
            offsets.append(b)
        assert sorted(order) == [0, 1, 2]
        orders.add(tuple(order))
    assert len(orders) == 6  # every order of three channels turns up among 300 images
    assert min(gains) < 0.65 and max(gains) > 1.35 and max(map(abs, offsets)) > 0.55  # scaled by the range
    assert len({round(a, 4) for a in gains[0::3]}) > 250  # drawn per image


def test_colour_comes_after_the_views_and_the_mix():
    """``affine+cutmix+colour`` is ``affine+cutmix`` then ``recolour``, with the same generator carried on."""
    x = torch.rand(16, 3, 16, 16)
    got = augment(x, "affine+cutmix+colour", torch.Generator().manual_seed(5), lo=0.0, hi=1.0)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(got, recolour(augment(x, "affine+cutmix", g), g, 0.0, 1.0))


def test_colour_views_stay_in_the_raw_range_and_tint_grey_images():
    """Clamped to ``[lo, hi]``; a grey image (three equal channels) comes out tinted: its channels differ."""
    x = torch.rand(64, 1, 8, 8).expand(64, 3, 8, 8).clone()
    v = augment(x, "affine+cutmix+colour", torch.Generator().manual_seed(1))
    assert v.min() >= 0 and v.max() <= 1
    assert ((v[:, 0] - v[:, 1]).abs().amax((1, 2)) > 0.05).float().mean() > 0.9


def test_views_that_cannot_act_are_refused_not_skipped():
    """Views chosen (by the library: other than the default's) that cannot act are refused before any step: image
    views on inputs that are not images (checked first), any view or disagreement push without a teacher to
    label it. What they can act on still runs, and mixup on vectors really mixes: the teacher labels inputs that
    are none of the set's."""
    for views in ("affine", "none+cutmix", "none+colour", "shift+mix+backdrop"):
        with pytest.raises(DfkdError, match=rf"augment: {re.escape(views)} needs images \[C, H, W\]; these inputs are \(20,\)"):
            check_views(DistillConfig(augment=views), False, shape=(20,))  # the shape's refusal before the teacher's
        check_views(DistillConfig(augment=views), True, shape=(3, 8, 8))  # images take them
    with pytest.raises(DfkdError, match="needs images"):  # the default's views, typed (the command line says so)
        check_views(DistillConfig(), True, chosen=True, shape=(20,))
    check_views(DistillConfig(), True, shape=(20,))  # not typed: the default's pass vectors through
    check_views(DistillConfig(augment="none+mix"), True, shape=(20,))
    with pytest.raises(DfkdError, match="teacher: the views affine\\+cutmix are labelled by the teacher"):
        check_views(DistillConfig(), False, chosen=True, shape=(3, 8, 8))

    g = torch.Generator().manual_seed(0)
    x, logits = torch.rand(16, 20, generator=g), torch.randn(16, 10, generator=g)
    seen = []

    class Teacher(nn.Module):
        def forward(self, v):
            seen.append(v.detach().clone())
            return torch.zeros(len(v), 10)

    class Student(nn.Linear):
        calls = 0

        def forward(self, v):
            Student.calls += 1
            return super().forward(v)

    def run(augment=DistillConfig.augment, teacher=None, adversarial=0.0):
        st = Student(20, 10)
        before = [p.detach().clone() for p in st.parameters()]
        distill(st, (x, logits), teacher, DistillConfig(epochs=1, batch_size=8, augment=augment, adversarial=adversarial))
        return any(not torch.equal(a, b) for a, b in zip(before, st.parameters()))

    with pytest.raises(DfkdError, match="teacher: the views none\\+mix are labelled by the teacher"):
        run("none+mix")
    with pytest.raises(DfkdError, match="teacher: the inputs pushed towards disagreement"):
        run(adversarial=0.5)
    assert Student.calls == 0  # refused before the student saw an input
    assert run() and run("none")  # the default and none distill on the stored logits as they are
    assert run("none+mix", Teacher())
    mixed = torch.cat(seen[1:])  # the first call: the teacher's classes, on the first batch as it is
    assert mixed.shape[1] == 20 and not any(torch.equal(m, r) for m in mixed for r in x)
