"""``cifar10:DIR``: CIFAR-10 in its standard python form, the folder ``cifar-10-batches-py`` (given, or
found inside ``DIR``) with ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``.

Each file is a pickle: a dict whose ``data`` is a uint8 array ``[N, 3072]`` (each row the red, then the
green, then the blue 32x32 plane) and whose ``labels`` are N class indices; ``batches.meta`` holds the
``label_names``. The pickles are read by ``pickles.restricted_unpickle``, which builds every array itself
from the bytes the file holds, so a tampered file is refused in one line, never runs code and never
claims more memory than its size; every shape and label is checked before use.
The five training batches (150 MB as uint8) and the test batch are held in memory, as the bundled MNIST is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import DataInfo, DataSource, RawImages, as_labels
from .errors import DfkdError
from .files import read_bytes
from .pickles import restricted_unpickle

TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST, META = "test_batch", "batches.meta"
SIDE, CLASSES = 32, 10
MAX_FILE_BYTES = 64 * 2 ** 20  # a standard batch is 31 MB


def cifar_dir(arg: str) -> Path:
    """The folder holding the batches: ``arg`` itself, or its ``cifar-10-batches-py`` (as the archive unpacks)."""
    root = Path(arg)
    inner = root / "cifar-10-batches-py"
    return inner if inner.is_dir() and not (root / META).is_file() else root


def cifar_files(arg: str) -> list[tuple[str, Path]]:
    """Every file the source reads, by its standard name (each must exist)."""
    root = cifar_dir(arg)
    files = [(name, root / name) for name in (*TRAIN, TEST, META)]
    missing = [name for name, p in files if not p.is_file()]
    if missing:
        raise DfkdError(f"cifar10:{arg}", f"not a CIFAR-10 python folder: {', '.join(missing)} missing in {root} "
                        "(expected the unpacked cifar-10-python archive)")
    return files


def _field(d: dict, key: str, path: Path):
    """A field of a batch's dict, whose keys are ``str`` (pickled by Python 2, read as latin-1) or ``bytes``."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise DfkdError(path, f"holds no {key!r} (not a CIFAR-10 batch)")


def _load(path: Path) -> dict:
    d = restricted_unpickle(read_bytes(path, "a CIFAR-10 batch file", MAX_FILE_BYTES), path)
    if not isinstance(d, dict):
        raise DfkdError(path, f"holds a {type(d).__name__}, not a CIFAR-10 batch's dict")
    return d


def _batch(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """One batch's images ``[N, 3, 32, 32]`` (uint8) and labels, their shapes and values checked."""
    d = _load(path)
    x, y = _field(d, "data", path), _field(d, "labels", path)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * SIDE * SIDE \
            or not len(x):
        raise DfkdError(path, f"its data must be a uint8 array [N, {3 * SIDE * SIDE}], N > 0 (got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')})")
    if isinstance(y, list) and all(type(v) is int for v in y):  # as written: a list of ints
        y = np.array(y, dtype=np.int64) if all(-2 ** 63 <= v < 2 ** 63 for v in y) else None
    if not isinstance(y, np.ndarray):
        raise DfkdError(path, "its labels must be a list of integers")
    labels = as_labels(y, path, CLASSES)
    if len(labels) != len(x):
        raise DfkdError(path, f"{len(x)} images but {len(labels)} labels")
    return x.reshape(-1, 3, SIDE, SIDE), labels


def _names(path: Path) -> tuple[str, ...]:
    names = _field(_load(path), "label_names", path)
    if not isinstance(names, list) or len(names) != CLASSES or not all(isinstance(n, (str, bytes)) for n in names):
        raise DfkdError(path, f"its label_names must be {CLASSES} names")
    return tuple(n.decode("latin-1") if isinstance(n, bytes) else n for n in names)


def cifar_source(arg: str) -> DataSource:
    """The 50,000 training and 10,000 test images of CIFAR-10 (or however many the batches hold), raw
    values in [0, 1] (8-bit / 255), with the class names of ``batches.meta``."""
    files = dict(cifar_files(arg))
    parts = [_batch(files[name]) for name in TRAIN]
    xtr, ytr = np.concatenate([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xte, yte = _batch(files[TEST])
    info = DataInfo(shape=(3, SIDE, SIDE), num_classes=CLASSES, class_names=_names(files[META]), name=f"cifar10:{arg}")
    return DataSource(RawImages(xtr, ytr, info, 255.0), RawImages(xte, yte, info, 255.0), info)
