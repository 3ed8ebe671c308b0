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
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data import DataInfo, Normalised
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
    """sha256 of the file a code spec names (a module's file for ``package.module:factory``); None for
    a registry name (or anything not a code spec)."""
    if not is_code_spec(spec):
        return None
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


_USER_CODE: set[str] = set()  # where the model code the user named lives (see user_code)


def user_code() -> tuple[str, ...]:
    """The files and package folders of the model code the user named in this process, wherever
    installed (a package in site-packages too): an error raised there is the user's, not dfkd's."""
    return tuple(sorted(_USER_CODE))


def _remember(target: str) -> None:
    """Note where a spec's code lives: a file itself, or a module's top-level package (not dfkd's own,
    nor torch's, which dfkd drives itself)."""
    if target.endswith(".py"):
        _USER_CODE.add(str(Path(target).resolve()))
        return
    top = target.split(".")[0]
    if top in ("dfkd", "torch"):
        return
    module = sys.modules.get(top)
    places = list(getattr(module, "__path__", None) or []) or [getattr(module, "__file__", None)]
    _USER_CODE.update(str(Path(p).resolve()) for p in places if p)


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
    _remember(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DfkdError(spec, f"{target} defines no callable {attr!r}")
    return factory


def spec_name(spec: str) -> str:
    """A spec as a shipped file names it: a code spec by its file's name (``own_model.py:student``), no path."""
    file, colon, factory = spec.rpartition(":")
    return f"{Path(file).name}:{factory}" if colon and file.endswith(".py") else spec


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
    check_outputs(model, info, spec)
    _NAMES[model] = spec
    return model, info


def check_outputs(model: nn.Module, info: DataInfo, where: object) -> None:
    """Run ``model`` once on two zero inputs of ``info.shape`` (eval mode, no gradient, the random
    state kept) and refuse, in one line naming ``where``, what is not one tensor of logits
    ``[N, >= classes]``: a tuple, list or dict, a single logit, fewer outputs than classes. Every
    command builds a user's model here, so none meets such output deep in its work. A forward that
    fails is left to the command's first real pass, which says which inputs did not fit."""
    was = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = model.eval()(torch.zeros(2, *info.shape, device=device_of(model)))
    except Exception:
        return
    finally:
        model.train(was)
    want = f"[N, {info.num_classes}]"
    if not isinstance(out, torch.Tensor):
        what = "None" if out is None else f"a {type(out).__name__}"
        raise DfkdError(where, f"the model returned {what}, expected one tensor of logits {want}")
    if out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < info.num_classes:
        raise DfkdError(where, f"the model returned a tensor of shape {tuple(out.shape)} for 2 inputs, expected "
                        f"logits {want} (one per class)")


# the spec each model was built from, for naming it where it misbehaves later (train_logits)
_NAMES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def train_logits(model: nn.Module, x: torch.Tensor, classes: int | None = None) -> torch.Tensor:
    """``model(x)`` where a loss is computed in training mode, refused in one line naming the model
    unless it is one tensor of logits ``[len(x), C]`` (``C == classes`` where given).
    ``check_outputs`` probes eval mode only, and some models answer otherwise in training mode
    (torchvision's GoogLeNet and Inception return their auxiliary outputs)."""
    out = model(x)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == len(x) \
            and (classes is None or out.shape[1] == classes):
        return out
    inner = getattr(model, "module", model)  # through DDP
    inner = inner.net if isinstance(inner, Normalised) else inner  # and the input normalisation
    name = _NAMES.get(inner) or type(inner).__name__
    want = f"[N, {classes}]" if classes is not None else "[N, classes]"
    if not isinstance(out, torch.Tensor):
        what = "None" if out is None else f"a {type(out).__name__}"
    else:
        what = f"a tensor of shape {tuple(out.shape)} for {len(x)} inputs"
    raise DfkdError(name, f"in training mode the model returned {what}, expected one tensor of logits {want} "
                    "(as in eval mode); make its forward return only the logits when training")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers that keep running statistics, with their paths."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


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
