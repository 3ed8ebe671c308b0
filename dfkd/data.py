"""What a model's inputs look like, a source's two splits, and streaming batches.

``DataInfo`` is the one description of a model's data: the shape of one input, the class
count and names, the raw value range and the per-channel normalisation
``model input = (raw - mean) / std``. It is saved beside every model, in every statistics
file and every synthetic set. Everything dfkd stores or optimises is raw (in the data's units and range);
the normalisation is applied once, at the call into the network (``at_input``).

``sources.open_data(spec)`` resolves a data spec into a ``DataSource`` of two streaming datasets.
The API also takes any torch ``Dataset`` or ``DataLoader`` yielding ``(input, label)`` (``as_batches``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import DfkdError


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: the statistics are stored in float32
MAX_INPUT, MAX_CLASSES = 2 ** 28, 2 ** 20  # declared sizes beyond these are refused before anything is allocated


@dataclass(frozen=True)
class DataInfo:
    shape: tuple[int, ...]                    # one model input: (C, H, W), or (D,) for vectors
    num_classes: int
    mean: tuple[float, ...] = (0.0,)          # per channel (or one for all): input = (raw - mean) / std
    std: tuple[float, ...] = (1.0,)
    low: float = 0.0                          # the raw values' range (images: 0 = black, 1 = white)
    high: float = 1.0
    class_names: tuple[str, ...] | None = None
    name: str = "custom"                      # where the data came from (a spec string)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Any, where: object) -> "DataInfo":
        if not isinstance(d, dict):
            raise DfkdError(where, "bad data description (not a JSON object)")
        try:
            names = d.get("class_names")
            info = cls(shape=tuple(int(s) for s in d["shape"]), num_classes=int(d["num_classes"]),
                       mean=tuple(float(v) for v in d.get("mean", (0.0,))),
                       std=tuple(float(v) for v in d.get("std", (1.0,))), low=float(d.get("low", 0.0)),
                       high=float(d.get("high", 1.0)), class_names=tuple(str(n) for n in names) if names else None,
                       name=str(d.get("name", "custom")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DfkdError(where, f"bad data description ({type(e).__name__}: {e})") from None
        info.check(where)
        return info

    def check(self, where: object = "data") -> None:
        channels = self.shape[0] if len(self.shape) == 3 else 1
        if not 1 <= len(self.shape) <= 3 or any(s <= 0 for s in self.shape) or math.prod(self.shape) > MAX_INPUT \
                or not 2 <= self.num_classes <= MAX_CLASSES:
            raise DfkdError(where, f"bad input shape {self.shape} or class count {self.num_classes} (dfkd takes "
                            f"[D], [H, W] or [C, H, W] inputs of at most {MAX_INPUT:,} values, 2 to {MAX_CLASSES:,} classes)")
        for what, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, channels) or not all(math.isfinite(x) for x in v):
                raise DfkdError(where, f"normalisation {what} {list(v)} does not fit {channels} channel(s)")
        if min(self.std) <= 0 or not self.low < self.high or not math.isfinite(self.high - self.low):
            raise DfkdError(where, f"std must be > 0 and low < high (std {list(self.std)}, range {self.low}..{self.high})")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DfkdError(where, f"{len(self.class_names)} class names for {self.num_classes} classes")

    def per_channel(self, v: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
        """``v`` (one value, or one per channel) as a tensor on ``x``'s device and dtype that broadcasts
        over a batch ``x`` ``[N, C, ...]``."""
        t = torch.tensor(v, dtype=x.dtype, device=x.device)
        return t.view(1, -1, *([1] * (x.dim() - 2))) if len(v) > 1 else t

    @property
    def plain(self) -> bool:
        """No normalisation: the model takes the raw values as they are."""
        return self.mean == (0.0,) and self.std == (1.0,)

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw values ``[N, *shape]`` in the data's range to model inputs (done only at the call into the
        network: ``at_input``)."""
        if self.plain:
            return raw
        return (raw - self.per_channel(self.mean, raw)) / self.per_channel(self.std, raw)

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs back to raw values (an answer computed in the network's input space, such as the
        closed-form inversion's)."""
        if self.plain:
            return x
        return x * self.per_channel(self.std, x) + self.per_channel(self.mean, x)

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs clamped, in place, to the data's range ``[low, high]``."""
        return x.clamp_(self.low, self.high)

    def fitted(self, shape: tuple[int, ...]) -> "DataInfo":
        return replace(self, shape=tuple(shape))


def declared_range(info: DataInfo, value_range: tuple[float, float]) -> DataInfo:
    """``info`` with the raw range the user declared (``--range``), which must hold the source's own (its
    format's, or the one read from the data: a refusal only the data's owner sees)."""
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and math.isfinite(hi - lo)
            and max(abs(lo), abs(hi)) <= FLOAT32_MAX):
        raise DfkdError("value_range", f"{lo:g},{hi:g} is not a range: needs LOW < HIGH, both finite in float32 "
                        f"(|value| <= {FLOAT32_MAX:.4g})")
    if info.low < lo or info.high > hi:
        raise DfkdError("value_range", f"{lo:g},{hi:g} does not hold the data's values, which span "
                        f"{info.low:g}..{info.high:g}")
    return replace(info, low=lo, high=hi)


def fit_shape(raw: torch.Tensor, shape: tuple[int, ...], where: object = "data") -> torch.Tensor:
    """Raw inputs ``[N, ...]`` to ``shape``: a channel axis added to ``[N, H, W]``, and centred zero
    padding (raw 0: black) where the model is larger (MNIST's 28x28 -> LeNet-5's 32x32)."""
    if len(shape) == 3 and raw.dim() == 3:
        raw = raw.unsqueeze(1)
    if tuple(raw.shape[1:]) == tuple(shape):
        return raw
    if len(shape) != 3 or raw.dim() != 4 or raw.shape[1] != shape[0]:
        raise DfkdError(where, f"inputs of shape {tuple(raw.shape[1:])} do not fit the model's {tuple(shape)}")
    dh, dw = shape[1] - raw.shape[2], shape[2] - raw.shape[3]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise DfkdError(where, f"images of {tuple(raw.shape[2:])} do not fit the model's input {shape[1]}x{shape[2]}")
    return F.pad(raw, (dw // 2, dw // 2, dh // 2, dh // 2))


class RawImages(Dataset):
    """A split of raw images (any indexable of ``[H, W]``/``[C, H, W]`` arrays in ``[0, 255]`` if
    uint8, else in the data's raw range) as raw float inputs in the data's range, fitted to ``info.shape``
    (normalised only at the call into the network: ``at_input``)."""

    def __init__(self, images, labels: torch.Tensor, info: DataInfo, divide: float = 1.0):
        self.images, self.labels, self.info, self.divide = images, labels, info, divide

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        raw = torch.as_tensor(self.images[idx.numpy()] if not torch.is_tensor(self.images) else self.images[idx])
        raw = raw.float() / self.divide if self.divide != 1.0 else raw.float()
        return fit_shape(raw, self.info.shape), self.labels[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]


@dataclass
class DataSource:
    """A training and a test split (either may be None) and their ``DataInfo``. ``origin`` says where the
    info's ``range`` and ``normalisation`` came from where not the format's fixed values: ``data`` (read off
    the training examples: a float npz's range, ``normalize="auto"``), ``user`` (declared) or ``model``."""
    train: Dataset | None
    test: Dataset | None
    info: DataInfo
    origin: dict = field(default_factory=dict)

    def with_info(self, info: DataInfo) -> "DataSource":
        """The same data described (normalised, fitted) by ``info``: its splits follow."""
        for split in (self.train, self.test):
            if split is not None and hasattr(split, "info"):
                split.info, split.origin = info, self.origin  # a split passed alone says where info came from
        self.info = info
        return self

    def fitted(self, shape: tuple[int, ...]) -> "DataSource":
        """The same data fitted (padded) to a model's input shape."""
        return self.with_info(self.info.fitted(shape))


class Normalised(nn.Module):
    """A network behind its input normalisation: it takes raw inputs, ``net(info.to_model(raw))``. It holds
    no parameter of its own, hooks go on ``net``'s modules, and its mode is ``net``'s (a fresh wrapper
    reports the mode ``net`` is in, so code that saves and restores a mode keeps ``net``'s); dfkd saves and
    resumes ``net`` itself, never the wrapper (whose ``state_dict`` keys carry a ``net.`` prefix)."""

    def __init__(self, net: nn.Module, info: DataInfo):
        super().__init__()
        self.net, self.info = net, info

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.net.training

    @training.setter
    def training(self, mode: bool) -> None:  # nn.Module sets it; ``train(mode)`` sets it on ``net`` too
        pass

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.net(self.info.to_model(raw))


def at_input(net: nn.Module, info: "DataInfo | None") -> nn.Module:
    """``net`` as called on raw inputs: behind its normalisation (``info``'s), or itself where there is none.
    The one place inputs are normalised; a network already behind it is not normalised twice."""
    if info is None or info.plain or isinstance(net, Normalised):
        return net
    return Normalised(net, info)


def described(data):
    """The object that describes ``data``: ``data`` itself or what it wraps (``DataLoader.dataset``,
    ``Subset.dataset``) when it carries a ``DataInfo`` as ``info`` (a ``DataSource``, a split of one, a
    synthetic set's stream), else None."""
    for _ in range(8):
        if isinstance(getattr(data, "info", None), DataInfo):
            return data
        data = getattr(data, "dataset", None)
        if data is None:
            break
    return None


def info_of(data) -> "DataInfo | None":
    """The ``DataInfo`` that describes ``data`` (``described``), else None: a plain Dataset, DataLoader or
    tensors are taken as the network's inputs."""
    d = described(data)
    return d.info if d is not None else None


def as_batches(data, batch_size: int, order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, labels)`` batches from a Dataset (in ``order`` if given), a DataLoader (as it
    yields), or an ``(x, y)`` pair of tensors. Nothing beyond one batch is held."""
    if isinstance(data, DataLoader):
        for xb, yb in data:
            yield xb, torch.as_tensor(yb)
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x, y = data
        for i in range(0, len(order) if order is not None else len(x), batch_size):
            idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            yield x[idx], y[idx]
        return
    n = len(data)
    for i in range(0, len(order) if order is not None else n, batch_size):
        idx = order[i:i + batch_size] if order is not None else torch.arange(i, min(n, i + batch_size))
        if hasattr(data, "batch"):
            yield data.batch(idx)
        else:
            items = [data[int(j)] for j in idx]
            yield torch.stack([torch.as_tensor(a) for a, _ in items]), torch.as_tensor([int(b) for _, b in items])


def as_labels(y: np.ndarray, where: object, num_classes: int | None = None) -> torch.Tensor:
    """Class labels read from a file as a tensor: a 1-d integer array in ``[0, num_classes)`` (where
    given), else one line naming ``where``."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DfkdError(where, f"labels must be a 1-d integer array (got {y.dtype} of shape {y.shape})")
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise DfkdError(where, f"labels must lie in [0, {(num_classes or 0) - 1}]")
    return torch.from_numpy(y.astype(np.int64))


def data_len(data) -> int:
    if isinstance(data, DataLoader):
        return len(data.dataset)
    return len(data[0]) if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]) \
        else len(data)


def first_batch(data, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(as_batches(data, n)))
