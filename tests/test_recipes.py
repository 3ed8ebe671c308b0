"""The recipe's techniques against independent computations: the class-mean start (the class means
the statistics reveal, against the data's own in float64), CutMix and mixup views (against a
per-sample loop), and the start they give a reconstruction. Models dfkd did not define (a GELU
MLP; a BatchNorm/residual/global-pooling CNN) on 3-channel images made here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd.config import ReconstructConfig, RecordConfig
from dfkd.data import DataInfo
from dfkd.views import augment, cutmix
from dfkd.errors import DfkdError
from dfkd.inversion import revealed_means
from dfkd.reconstruction import reconstruct
from dfkd.recording import record
from dfkd.synthetic import SyntheticSet

from tests.test_privacy import INFO, Tiny, blobs


class GeluMLP(nn.Module):
    """Normalised 3x4x4 images -> Linear(48, 64) -> GELU -> Linear(64, 3): the first layer has full column rank."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(48, 64), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x.flatten(1))))


SMALL = DataInfo(shape=(3, 4, 4), num_classes=3, low=0.0, high=1.0, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                 name="colour 4x4")


def _data(n=600):
    x, y = blobs(n)
    return torch.nn.functional.avg_pool2d(x, 2), y  # raw 3x4x4 in [0, 1]


def test_revealed_means_equal_the_class_means_of_the_data():
    torch.manual_seed(0)
    model = GeluMLP().eval()
    raw, y = _data()
    meta = record(model, (raw, y), RecordConfig(kinds=("all-layers",)), SMALL)
    got = revealed_means(model, meta)
    truth = torch.stack([raw[y == c].double().mean(0) for c in range(3)])  # raw units, float64
    assert got.shape == (3, 3, 4, 4)
    assert torch.allclose(got.double(), truth, atol=2e-4), float((got.double() - truth).abs().max())


def test_class_mean_start_and_its_fallback(tmp_path):
    torch.manual_seed(0)
    model = GeluMLP().eval()
    raw, y = _data()
    meta = record(model, (raw, y), RecordConfig(kinds=("all-layers",)), SMALL)
    cfg = ReconstructConfig(objective="all-layers", n=30, batch_size=30, steps=0, init="class-mean", init_std=0.0)
    reconstruct(model, meta, tmp_path / "cm", cfg)
    x, labels, _ = SyntheticSet(tmp_path / "cm").open().load()
    truth = torch.stack([raw[y == c].mean(0) for c in range(3)])
    assert torch.allclose(x, truth[labels].clamp(0, 1), atol=2e-4)  # steps 0: the start itself
    # a per-channel conv record (BN/residual CNN) reveals no full-rank mean: auto starts from noise, class-mean refuses
    tiny = Tiny().eval()
    bx, by = blobs(90)
    cmeta = record(tiny, (bx, by), RecordConfig(kinds=("all-layers",)), INFO)
    assert revealed_means(tiny, cmeta) is None
    auto = ReconstructConfig(objective="all-layers", n=6, batch_size=6, steps=0, init="auto")
    reconstruct(tiny, cmeta, tmp_path / "auto", auto)
    reconstruct(tiny, cmeta, tmp_path / "noise", ReconstructConfig(**{**auto.__dict__, "init": "noise"}))
    a, n = (SyntheticSet(tmp_path / k).open().load()[0] for k in ("auto", "noise"))
    assert torch.equal(a, n)
    with pytest.raises(DfkdError, match="reveal no class mean"):
        reconstruct(tiny, cmeta, tmp_path / "cm2", ReconstructConfig(**{**auto.__dict__, "init": "class-mean"}))
    with pytest.raises(DfkdError, match="init"):
        reconstruct(tiny, cmeta, tmp_path / "bad", ReconstructConfig(**{**auto.__dict__, "init": "mean"}))


def _cutmix_loop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """CutMix written per sample with slices (the same draws as ``cutmix``)."""
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    lam = torch.rand(n, generator=g)
    cy, cx = (torch.rand(n, generator=g) * h).long(), (torch.rand(n, generator=g) * w).long()
    out = x.clone()
    for i in range(n):
        bh, bw = round(h * (1 - lam[i].item()) ** 0.5), round(w * (1 - lam[i].item()) ** 0.5)
        top, left = int(cy[i]) - bh // 2, int(cx[i]) - bw // 2
        r0, r1, c0, c1 = max(top, 0), min(top + bh, h), max(left, 0), min(left + bw, w)
        out[i, :, r0:r1, c0:c1] = x[n - 1 - i, :, r0:r1, c0:c1]
    return out


def test_cutmix_pastes_one_box_of_the_partner():
    x = torch.rand(9, 3, 11, 13, generator=torch.Generator().manual_seed(1))
    got = cutmix(x, torch.Generator().manual_seed(5))
    want = _cutmix_loop(x, torch.Generator().manual_seed(5))
    assert torch.equal(got, want)
    changed = (got != x).any(1).float().mean((1, 2))
    assert 0.05 < float(changed.mean()) < 0.95  # boxes of every size, not all empty nor all full
    # in the augmentation chain: affine first, then the box; vectors are left to +mix
    v = torch.rand(8, 20)
    assert torch.equal(augment(v, "affine+cutmix", torch.Generator().manual_seed(0)), v)


def test_mix_is_a_convex_mix_with_the_reversed_batch():
    x = torch.rand(6, 20, generator=torch.Generator().manual_seed(2))  # vectors mix too
    got = augment(x, "none+mix", torch.Generator().manual_seed(3))
    lam = torch.rand((6, 1), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, lam * x + (1 - lam) * x.flip(0))


def test_disagreement_views_follow_the_sign_of_the_kd_gradient():
    """One step of ``disagree`` against central finite differences of the KD loss in float64; it
    raises the loss, stays in the data's range, and leaves both models' modes and weights alone."""
    from dfkd.config import DistillConfig
    from dfkd.distillation import disagree
    from dfkd.losses import kd_loss
    torch.manual_seed(0)
    student, teacher = GeluMLP().double().train(), GeluMLP().double().eval()
    before = [p.clone() for p in student.parameters()]
    x = _data(8)[0].double()  # raw
    cfg = DistillConfig(adversarial=1.0, adversarial_steps=1, adversarial_step=0.05)
    got, labels = disagree(student, teacher, x, cfg, SMALL)
    with torch.no_grad():
        assert torch.allclose(labels, teacher(SMALL.to_model(got)).float())

    def loss(v):  # the networks see the raw views normalised
        student.eval()
        with torch.no_grad():
            out = kd_loss(student(SMALL.to_model(v)), teacher(SMALL.to_model(v)), cfg.temperature)
        student.train()
        return float(out)
    flat, h = x.flatten(), 1e-6
    num = torch.zeros_like(flat)
    for i in range(len(flat)):
        e = torch.zeros_like(flat)
        e[i] = h
        num[i] = (loss((flat + e).view_as(x)) - loss((flat - e).view_as(x))) / (2 * h)
    want = (x + 0.05 * num.view_as(x).sign()).clamp(SMALL.low, SMALL.high)  # raw units, the raw range
    assert torch.allclose(got, want, atol=1e-12)
    assert loss(got) > loss(x)
    assert student.training and not teacher.training
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    raw_got = got
    assert float(raw_got.min()) >= -1e-12 and float(raw_got.max()) <= 1 + 1e-12


def test_the_noise_baseline_never_starts_from_the_revealed_means(tmp_path):
    torch.manual_seed(0)
    model = GeluMLP().eval()
    raw, y = _data()
    meta = record(model, (raw, y), RecordConfig(kinds=("all-layers",)), SMALL)
    assert revealed_means(model, meta) is not None
    for init in ("auto", "class-mean", "noise"):
        reconstruct(model, meta, tmp_path / init, ReconstructConfig(objective="noise", n=12, batch_size=12, init=init))
    xs = [SyntheticSet(tmp_path / k).open().load()[0] for k in ("auto", "class-mean", "noise")]
    assert torch.equal(xs[0], xs[2]) and torch.equal(xs[1], xs[2])
    assert abs(float(xs[2].mean()) - 0.15) < 0.03  # the paper's N(0.15, 0.1), clamped
