import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dfkd.config import TrainConfig
from dfkd.data import open_data
from dfkd.evaluation import evaluate
from dfkd.models import build_model
from dfkd.training import cross_entropy_loss, fit, train


def test_trained_teacher_beats_stated_accuracy(teacher, small):
    # 3 epochs on 6,000 real images (conftest); judged on all 10,000 real test images, streamed
    res = evaluate(teacher, open_data("mnist", info=small.info))
    assert res["accuracy"] > 0.94 and res["n"] == 10000
    assert set(res["per_class"]) == {str(i) for i in range(10)} and min(res["per_class"].values()) > 0.8


def test_agreement_and_share(teacher, small):
    res = evaluate(teacher, small.test, teacher=teacher)
    assert res["agreement"] == 1.0 and abs(res["share_of_teacher"] - 1.0) < 1e-12


def test_a_dataloader_trains_like_a_dataset(small):
    """A user's DataLoader is used as it yields; the model learns from it."""
    x, y = small.train[0][:2000], small.train[1][:2000]
    torch.manual_seed(0)
    m, _ = build_model("lenet5-half", small.info)
    hist = train(m, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True), TrainConfig(epochs=2, lr=3e-3,
                                                                                              progress=False),
                 test=small.test)
    assert hist[-1]["test_accuracy"] > 0.5


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
