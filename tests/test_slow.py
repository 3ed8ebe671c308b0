"""Full-size checks of the stated targets (run with `make test-slow`; minutes on 2 cores)."""
import pytest
import torch

from dfkd.config import TrainConfig
from dfkd.evaluate import evaluate_model
from dfkd.models import build_model
from dfkd.train import train_model

TARGETS = {"lenet5": 0.989, "lenet5-half": 0.986, "hinton-1200": 0.980, "hinton-800": 0.975}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_default_training_meets_target(name, mnist):
    torch.manual_seed(0)
    model = build_model(name)
    train_model(model, mnist, TrainConfig(model=name, seed=0, progress=False))
    assert evaluate_model(model, mnist)["accuracy"] >= TARGETS[name]
