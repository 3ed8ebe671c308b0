"""The paper's reference networks and their registry.

Layers have stable names (``fc1``, ``conv2``...) so that taps and metadata files can
address them by ``named_modules()`` path. Every network carries ``input_shape``
(channels, height, width) so that the data pipeline knows how to feed it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .errors import DfkdError


class MLP(nn.Sequential):
    """Hinton et al.'s fully connected net: ReLU, dropout on the input and hidden layers."""

    def __init__(self, sizes: tuple[int, ...] = (784, 1200, 1200, 10),
                 dropout_input: float = 0.2, dropout_hidden: float = 0.5, side: int = 28):
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten()), ("drop0", nn.Dropout(dropout_input))]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers.append((f"fc{i}", nn.Linear(a, b)))
            if i < len(sizes) - 1:
                layers += [(f"relu{i}", nn.ReLU()), (f"drop{i}", nn.Dropout(dropout_hidden))]
        super().__init__(OrderedDict(layers))
        self.input_shape = (1, side, side)
        self.num_classes = sizes[-1]


class LeNet5(nn.Sequential):
    """LeNet-5 with ReLU and max-pooling on 32x32 inputs (the paper's variant)."""

    def __init__(self, channels: tuple[int, int] = (6, 16), fc: tuple[int, int] = (120, 84),
                 num_classes: int = 10, in_channels: int = 1):
        c1, c2 = channels
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, c1, 5)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(c1, c2, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c2 * 25, fc[0])), ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(fc[0], fc[1])), ("relu4", nn.ReLU()),
            ("fc3", nn.Linear(fc[1], num_classes)),
        ]))
        self.input_shape = (in_channels, 32, 32)
        self.num_classes = num_classes


# name -> (class, keyword arguments). A literal dict: no registration by import side effect.
MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "hinton-1200": (MLP, {"sizes": (784, 1200, 1200, 10)}),
    "hinton-800": (MLP, {"sizes": (784, 800, 800, 10)}),
    "lenet5": (LeNet5, {"channels": (6, 16)}),
    "lenet5-half": (LeNet5, {"channels": (3, 8)}),
}


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registry network; unknown names list the valid ones."""
    if name not in MODELS:
        raise DfkdError("--model" if not name.endswith(".json") else name,
                        f"unknown model {name!r}; choose one of {', '.join(MODELS)} or give a saved model")
    cls, kwargs = MODELS[name]
    args = {**kwargs, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}}
    try:
        model = cls(**args)
    except TypeError as e:
        raise DfkdError(name, f"bad model arguments: {e}") from None
    model.arch, model.arch_args = name, args
    return model


def model_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The (C, H, W) a model expects; a user's model must declare ``input_shape``."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise DfkdError(type(model).__name__, "the model has no input_shape attribute; set model.input_shape = (C, H, W)")
    return tuple(shape)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batched, on the device of its parameters."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out
