import copy
import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dfkd.config import TrainConfig, to_dict
from dfkd.data import at_input
from dfkd.evaluation import evaluate
from dfkd.loop import fit
from dfkd.models import build_model
from dfkd.sources import open_data
from dfkd.training import augmented_loss, cross_entropy_loss, train
from tests.conftest import assert_count, near_ties


def test_trained_teacher_beats_stated_accuracy(teacher, small):
    # 3 epochs on 6,000 real images (conftest); judged on all 10,000 real test images, streamed
    res = evaluate(teacher, open_data("mnist", info=small.info))
    assert res["accuracy"] > 0.94 and res["n"] == 10000
    assert set(res["per_class"]) == {str(i) for i in range(10)} and min(res["per_class"].values()) > 0.8


def test_agreement_and_share(teacher, small):
    """A barely trained student (one epoch on 1,500 images: ~38% right) against the teacher on 1,000
    real test images: every figure against counts made here in float64 on copies of both models,
    each within the bounds the near ties (samples whose top-2 margin is within float32's rounding)
    leave, however they fall on this machine's kernels."""
    x, y = small.test
    torch.manual_seed(0)
    student, _ = build_model("lenet5-half", small.info)
    train(student, (small.train[0][:1500], small.train[1][:1500]), TrainConfig(epochs=1, lr=3e-3))
    res = evaluate(student, small.test, teacher=teacher)
    with torch.no_grad():
        out_s, out_t = (copy.deepcopy(m).double().eval()(x.double()) for m in (student, teacher))
        near_s, near_t = (near_ties(out, m.eval()(x)) for m, out in ((student, out_s), (teacher, out_t)))
    ps, pt = out_s.argmax(1), out_t.argmax(1)
    n = len(y)
    assert res["n"] == n == 1000
    # each figure from its own pair: a sample is uncertain where a model it compares is near a tie
    hits = {"accuracy": (ps == y, near_s), "teacher_accuracy": (pt == y, near_t),
            "agreement": (ps == pt, near_s | near_t)}
    counts = {key: assert_count(res[key], n, hit, near, key) for key, (hit, near) in hits.items()}
    assert 0 < counts["agreement"] < n
    # a figure computed from a wrong pair (or two swapped) fails above wherever the right and the wrong
    # pair's bounds do not overlap (here the student's ~38% and the teacher's ~95%); the comparison of
    # the teacher with itself below catches a wrong agreement without relying on that
    assert abs(res["share_of_teacher"] - res["accuracy"] / res["teacher_accuracy"]) < 1e-6
    for c in range(10):
        k = y == c
        assert_count(res["per_class"][str(c)], int(k.sum()), (ps == c)[k], near_s[k], c)
    # the teacher against itself: the same float32 predictions, so agreement is exactly 1 and its
    # accuracy is the teacher's whatever the near ties do
    own = evaluate(teacher, small.test, teacher=teacher)
    assert own["agreement"] == 1.0 and own["accuracy"] == own["teacher_accuracy"] == res["teacher_accuracy"]
    assert own["accuracy"] != 1.0


def test_a_dataloader_trains_like_a_dataset(small):
    """A user's DataLoader is used as it yields; the model learns from it."""
    x, y = small.train[0][:2000], small.train[1][:2000]
    torch.manual_seed(0)
    m, _ = build_model("lenet5-half", small.info)
    hist = train(m, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True), TrainConfig(epochs=2, lr=3e-3),
                 test=small.test)
    assert hist[-1]["test_accuracy"] > 0.5


def test_an_augmented_batch_is_the_batch_shifted_by_the_epochs_draw(small):
    """``--augment shift``: a batch's loss is the cross-entropy on the batch translated by the offset the epoch's
    generator gives (up to 2 pixels each way), the uncovered edge filled with the data's black (``info.low``, here
    -2, not the batch's own minimum -1), built here by slicing into a filled tensor; ``none`` is the plain loss."""
    x, y = small.train[0][:64] * 2 - 1, small.train[1][:64]
    info = dataclasses.replace(small.info, low=-2.0, high=2.0)
    torch.manual_seed(0)
    net, _ = build_model("lenet5-half", small.info)
    got = augmented_loss("shift", info)(net, x, y, torch.Generator().manual_seed(5))
    ox, oy = (v - 2 for v in torch.randint(0, 5, (2,), generator=torch.Generator().manual_seed(5)).tolist())
    h, w = x.shape[2:]
    want = torch.full_like(x, -2.0)  # want[i, j] = x[i + oy, j + ox] where that lies in the image
    want[:, :, max(0, -oy):h - max(0, oy), max(0, -ox):w - max(0, ox)] = \
        x[:, :, max(0, oy):h + min(0, oy), max(0, ox):w + min(0, ox)]
    assert ox != oy and not torch.equal(want, x)  # a swapped x and y would differ
    assert torch.allclose(got, torch.nn.functional.cross_entropy(net(want), y), atol=1e-6)
    assert augmented_loss("none", small.info) is cross_entropy_loss
    assert "augment" not in to_dict(TrainConfig()) and to_dict(TrainConfig(augment="shift"))["augment"] == "shift"


def test_a_resumed_augmented_training_equals_an_uninterrupted_one(small, tmp_path):
    """Training on affine and colour views, a run killed in its third epoch and resumed makes the very weights of
    one run straight through, and runs only that epoch again."""
    x, y = small.train[0][:500], small.train[1][:500]
    loss = augmented_loss("affine+colour", small.info)

    def run(state, on_epoch=None):
        torch.manual_seed(0)
        m, _ = build_model("lenet5-half", small.info)
        fit(m, (x, y), loss, epochs=3, batch_size=64, lr=1e-3, seed=3, state_path=state, on_epoch=on_epoch,
            progress=False)
        return m

    whole = run(None)

    def interrupt(_m):
        if interrupt.calls == 2:
            raise KeyboardInterrupt
        interrupt.calls += 1
        return {}
    interrupt.calls = 0
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "s.safetensors", interrupt)
    ran = []
    resumed = run(tmp_path / "s.safetensors", lambda _m: ran.append(1) or {})
    assert len(ran) == 1  # only the third epoch ran again
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_affine_augmentation_makes_a_model_that_reads_shifted_digits(small):
    """Trained on the same 2,000 real digits, the model trained on affine views reads test digits moved 2 pixels
    right and down far better than the one trained on the digits as they are; both are exact reruns of a seed."""
    x, y = small.train[0][:2000], small.train[1][:2000]
    xt, yt = small.test
    moved = torch.zeros_like(xt)
    moved[:, :, 2:, 2:] = xt[:, :, :-2, :-2]

    def trained(how):
        torch.manual_seed(0)
        m, _ = build_model("lenet5-half", small.info)
        train(m, (x, y), TrainConfig(epochs=6, lr=3e-3, augment=how))
        return m

    plain, augmented = trained("none"), trained("affine")
    acc = {k: (at_input(m, small.info)(moved).argmax(1) == yt).float().mean().item()
           for k, m in (("plain", plain), ("augmented", augmented))}
    assert acc["augmented"] > acc["plain"] + 0.10, acc  # 0.689 against 0.506 here
    again = trained("affine")
    assert all(torch.equal(a, b) for a, b in zip(augmented.state_dict().values(), again.state_dict().values()))


def test_resumed_training_equals_uninterrupted(small, tmp_path):
    x, y = small.train[0][:1000], small.train[1][:1000]

    def run(state, on_epoch=None):
        torch.manual_seed(0)
        m, _ = build_model("lenet5-half", small.info)
        fit(m, (x, y), cross_entropy_loss, epochs=3, batch_size=64, lr=1e-3, seed=3, state_path=state,
            on_epoch=on_epoch, progress=False)
        return m

    whole = run(None)
    state = tmp_path / "s.pt"
    calls = []

    def interrupt(_m):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during epoch 3, after epoch 2 was saved
        return {}

    with pytest.raises(KeyboardInterrupt):
        run(state, interrupt)
    torch.manual_seed(123)  # a different global RNG state must not matter
    m, _ = build_model("lenet5-half", small.info)
    hist = fit(m, (x, y), cross_entropy_loss, epochs=3, batch_size=64, lr=1e-3, seed=3, state_path=state, progress=False)
    assert len(hist) == 3
    for a, b in zip(whole.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)


def test_a_share_is_refused_where_a_stage_does_not_split_its_work(small):
    """Only reconstruct splits its work by rank and world size: train, record and distill refuse a share in one
    line (before any work) instead of silently doing all of it."""
    from dfkd.config import DistillConfig, RecordConfig, Runtime
    from dfkd.distillation import distill
    from dfkd.errors import DfkdError
    from dfkd.recording import record
    model = build_model("hinton-800", small.info)[0]
    share = Runtime(rank=1, world_size=2)
    x, y = small.train[0][:64], small.train[1][:64]
    for call in (lambda: train(model, (x, y), TrainConfig(epochs=1), rt=share),
                 lambda: record(model, (x, y), RecordConfig(kinds=("top-layer",)), rt=share),
                 lambda: distill(model, (x, torch.zeros(64, 10)), None, DistillConfig(epochs=1), rt=share)):
        with pytest.raises(DfkdError, match="only reconstruct"):
            call()
