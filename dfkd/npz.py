"""Arrays in an ``.npz`` file (``--data npz:FILE``): ``x``, ``y`` and optionally ``x_test``, ``y_test``;
uint8 images are scaled to [0, 1], float arrays keep their values. Uncompressed members are read row
by row from the file (``np.savez``); compressed ones (``np.savez_compressed``) are loaded whole.
"""
from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .data import DataInfo, DataSource, RawImages, as_labels
from .errors import DfkdError


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
    ys = {k: as_labels(v, f"{path}: {k}").numpy() for k, v in ys.items()}
    if not len(ys["y"]):
        raise DfkdError(path, "y holds no labels")
    c = int(max(int(v.max()) for v in ys.values() if len(v))) + 1
    where = f"npz:{arg}"
    splits, shape, divide = {}, None, 1.0
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if xk not in xs:
            continue
        rows, yv = xs[xk], as_labels(ys.get(yk, np.zeros(0, dtype=np.int64)), path, c)
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
