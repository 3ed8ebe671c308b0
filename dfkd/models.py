"""Models by name: the paper's reference networks (a registry), or a user's own code.

A model spec is a registry name (``lenet5``), a file and a factory (``path/to/net.py:make``)
or a module and a factory (``package.module:make``); the factory is any callable returning
an ``nn.Module``, called with the keyword arguments given (``--model-args``). Registry
networks take their input size and class count from the data; a user's model is used as
its code builds it. User code is imported only when the user names it (a spec on the
command line, or ``--code`` for a saved model made from code): never because a file says so.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data import DataInfo
from .errors import DfkdError


class MLP(nn.Sequential):
    """Hinton et al.'s fully connected net: ReLU, dropout on the input and hidden layers."""

    def __init__(self, hidden: tuple[int, ...] = (1200, 1200), in_features: int = 784, num_classes: int = 10,
                 dropout_input: float = 0.2, dropout_hidden: float = 0.5):
        sizes = (in_features, *hidden, num_classes)
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten()), ("drop0", nn.Dropout(dropout_input))]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers.append((f"fc{i}", nn.Linear(a, b)))
            if i < len(sizes) - 1:
                layers += [(f"relu{i}", nn.ReLU()), (f"drop{i}", nn.Dropout(dropout_hidden))]
        super().__init__(OrderedDict(layers))


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


def _mlp(info: DataInfo, **kw) -> tuple[nn.Module, tuple[int, ...]]:
    return MLP(in_features=math.prod(info.shape), num_classes=info.num_classes, **kw), info.shape


def _lenet(info: DataInfo, **kw) -> tuple[nn.Module, tuple[int, ...]]:
    if len(info.shape) != 3:
        raise DfkdError("model", f"lenet5 needs images, the data's inputs have shape {info.shape}")
    return LeNet5(in_channels=info.shape[0], num_classes=info.num_classes, **kw), (info.shape[0], 32, 32)


# name -> (builder from the data's description, default arguments). A literal dict: no registration
# by import side effect. A builder returns the network and the input shape it takes (LeNet-5: 32x32).
MODELS: dict[str, tuple[Callable[..., tuple[nn.Module, tuple[int, ...]]], dict[str, Any]]] = {
    "hinton-1200": (_mlp, {"hidden": (1200, 1200)}),
    "hinton-800": (_mlp, {"hidden": (800, 800)}),
    "lenet5": (_lenet, {"channels": (6, 16)}),
    "lenet5-half": (_lenet, {"channels": (3, 8)}),
}
MNIST_INFO = DataInfo(shape=(1, 28, 28), num_classes=10, name="mnist")


def is_code_spec(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target and attr.isidentifier() and (target.endswith(".py") or
                                                           all(p.isidentifier() for p in target.split("."))))


def code_sha256(spec: str) -> str | None:
    """sha256 of the file a code spec names (a module's file for ``package.module:factory``)."""
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        path = Path(target)
    else:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            return None
        path = Path(found.origin) if found is not None and found.origin else None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """Import the factory a code spec names; anything that goes wrong is one line naming the spec."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                raise DfkdError(spec, f"no such file {target}")
            name = "dfkd_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            if name not in sys.modules:
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.path.insert(0, str(path.parent))  # the file may import its neighbours
                try:
                    sys.modules[name] = module
                    mod_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
                finally:
                    sys.path.remove(str(path.parent))
            module = sys.modules[name]
        else:
            module = importlib.import_module(target)
    except DfkdError:
        raise
    except Exception as e:  # the user's code can raise anything while importing
        raise DfkdError(spec, f"cannot import the model code ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DfkdError(spec, f"{target} defines no callable {attr!r}")
    return factory


def build_model(spec: str, info: DataInfo | None = None, **args: Any) -> tuple[nn.Module, DataInfo]:
    """Build a registry network or a user's model; returns it and the data description it takes
    (a registry network fits the data's shape and class count, e.g. LeNet-5 pads to 32x32)."""
    info = info or MNIST_INFO
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    if spec in MODELS:
        builder, defaults = MODELS[spec]
        try:
            model, shape = builder(info, **{**defaults, **args})
        except TypeError as e:
            raise DfkdError("model_args", f"bad arguments for {spec}: {e}") from None
        return model, info.fitted(shape)
    if not is_code_spec(spec):
        raise DfkdError("model", f"unknown model {spec!r}; choose one of {', '.join(MODELS)}, "
                        "or give code as path/to/file.py:factory or package.module:factory")
    factory = import_factory(spec)
    try:
        model = factory(**args)
    except Exception as e:
        raise DfkdError(spec, f"the factory failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(model, nn.Module):
        raise DfkdError(spec, f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model, info


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batched, on the device of its parameters."""
    was = model.training
    model.eval()
    dev = device_of(model)
    out = torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def num_outputs(model: nn.Module, info: DataInfo) -> int:
    """The number of logits the model gives (one forward pass of a zero input)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *info.shape, device=device_of(model)))
    except RuntimeError as e:
        raise DfkdError("model", f"inputs of shape {info.shape} do not fit it: {str(e).splitlines()[0]}") from None
    finally:
        model.train(was)
    if out.dim() != 2:
        raise DfkdError("model", f"its output has shape {tuple(out.shape)}; a classifier gives [batch, classes]")
    return out.shape[1]
