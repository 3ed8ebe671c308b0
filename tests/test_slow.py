"""Full-size checks of the stated targets (run with `make test-slow`; minutes on 2 cores)."""
import pytest
import torch

from dfkd.config import TrainConfig
from dfkd.loop import accuracy
from dfkd.models import build_model
from dfkd.sources import open_data
from dfkd.training import train

TARGETS = {"lenet5": 0.989, "lenet5-half": 0.986, "hinton-1200": 0.980, "hinton-800": 0.975}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_default_training_meets_target(name, mnist):
    torch.manual_seed(0)
    model, info = build_model(name, mnist.info)
    data = open_data("mnist", info=info)
    train(model, data, TrainConfig(seed=0))
    assert accuracy(model, data.test) >= TARGETS[name]
