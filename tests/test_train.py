import pytest
import torch

from dfkd.data import to_input
from dfkd.evaluate import evaluate_model
from dfkd.models import build_model
from dfkd.train import cross_entropy_loss, fit


def test_trained_teacher_beats_stated_accuracy(teacher, mnist):
    # 3 epochs on 6,000 real images (conftest); judged on all 10,000 real test images
    res = evaluate_model(teacher, mnist)
    assert res["accuracy"] > 0.94 and res["n"] == 10000


def test_agreement_and_share(teacher, small):
    res = evaluate_model(teacher, small, teacher=teacher)
    assert res["agreement"] == 1.0 and abs(res["share_of_teacher"] - 1.0) < 1e-12


def test_resumed_training_equals_uninterrupted(small, tmp_path):
    x, y = to_input(small.train_x[:1000], (1, 32, 32)), small.train_y[:1000]

    def run(state, on_epoch=None):
        torch.manual_seed(0)
        m = build_model("lenet5-half")
        fit(m, x, y, cross_entropy_loss, epochs=3, batch_size=64, lr=1e-3, seed=3, state_path=state,
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
    m = build_model("lenet5-half")
    hist = fit(m, x, y, cross_entropy_loss, epochs=3, batch_size=64, lr=1e-3, seed=3, state_path=state, progress=False)
    assert len(hist) == 3
    for a, b in zip(whole.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)
