"""The data sources behind ``--data``, resolved in one place: a spec's prefix names its reader.

- ``mnist``: the bundled MNIST; ``idx:DIR``: IDX files (``digits``);
- ``folder:DIR``: class folders of images (``folders``);
- ``npz:FILE``: arrays ``x``, ``y`` and optionally ``x_test``, ``y_test`` (``npz``);
- ``cifar10:DIR``: CIFAR-10's python batches, read with the numpy-only unpickler (``cifar``).

``open_data`` opens a spec as a ``DataSource``; ``data_sha256`` hashes what a spec reads (its files'
content, never their location), which is how settings name data.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import replace
from pathlib import Path

from .cifar import cifar_files, cifar_source
from .data import DataInfo, DataSource, as_batches
from .digits import IDX_STEMS, find_file, idx_source, mnist_bytes, mnist_source
from .errors import DfkdError
from .folders import folder_files, folder_source
from .npz import npz_source

# name -> opener; a literal dict, the one place a data spec's prefix is resolved
SOURCES = {"mnist": mnist_source, "idx": idx_source, "folder": folder_source, "npz": npz_source,
           "cifar10": cifar_source}


def open_data(spec: str = "mnist", test: str | None = None, normalize: str | None = None,
              info: DataInfo | None = None) -> DataSource:
    """Resolve a data spec (``mnist``, ``idx:DIR``, ``folder:DIR``, ``npz:FILE``, ``cifar10:DIR``); ``test`` names
    another source for the test split. ``info`` (a model's saved description) fixes the
    normalisation and shape the model was trained with; else ``normalize`` sets them."""
    def resolve(s: str) -> DataSource:
        kind, _, arg = s.partition(":")
        if kind not in SOURCES or (kind != "mnist" and not arg):
            raise DfkdError("data", f"unknown data source {s!r}; use mnist, idx:DIR, folder:DIR, npz:FILE or cifar10:DIR")
        return SOURCES[kind](arg) if arg else SOURCES[kind]()

    data = resolve(spec)
    if test is not None:
        other = resolve(test)
        if other.info.class_names != data.info.class_names or other.info.num_classes != data.info.num_classes:
            raise DfkdError("test_data", "its classes differ from the training data's")
        data.test = other.test if other.test is not None else other.train
    if info is not None:
        if data.info.num_classes > info.num_classes:
            raise DfkdError("data", f"{data.info.num_classes} classes, but the model was made for {info.num_classes}")
        data.origin["normalisation"] = "model"
        return data.with_info(replace(info, name=data.info.name, low=data.info.low, high=data.info.high,
                                      class_names=info.class_names or data.info.class_names))
    return parse_normalize(normalize, data)


# --- data content -------------------------------------------------------------------------------
def _file_digest(path: Path) -> tuple[int, bytes]:
    """The size and sha256 of ``path``'s content, streamed. A gzipped file gives its content's:
    gzip stamps the time it compressed into its header, and a plain copy is the same data."""
    content, size = hashlib.sha256(), 0
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        while chunk := f.read(1 << 20):
            content.update(chunk)
            size += len(chunk)
    return size, content.digest()


def _data_files(kind: str, arg: str) -> list[tuple[str, Path]]:
    """The files a data spec reads, each with its label (its name or place inside the data)."""
    if kind == "idx":
        return [(stem, find_file(Path(arg), stem)) for stem in IDX_STEMS]
    if kind == "folder":
        root = Path(arg)
        return [(f.relative_to(root).as_posix(), f) for f in folder_files(root)]
    if kind == "npz":
        return [("", Path(arg))]
    if kind == "cifar10":
        return cifar_files(arg)
    return []


_DIGESTS: dict[tuple, str] = {}  # per process: (spec, each file's label, path, size, mtime, inode) -> sha256


def data_sha256(spec: str | None) -> str | None:
    """sha256 of what the data spec ``spec`` reads: its files' content, never their location (a
    moved copy is the same data, a file changed in place is not). ``idx:DIR``: its four IDX files;
    ``folder:DIR``: every image of its splits in sorted order, with its path inside ``DIR`` (the
    class folder is the label); ``npz:FILE``: the file; ``cifar10:DIR``: its six batches and batches.meta by name;
    ``mnist``: the bundled pickle. Streamed,
    nothing decoded; computed once per process for files that have not changed since."""
    if spec is None:
        return None
    kind, _, arg = spec.partition(":")
    h = hashlib.sha256(f"{kind}|".encode())
    try:
        if kind == "mnist":  # the bundled copy: read once per process
            if ("mnist",) not in _DIGESTS:
                h.update(mnist_bytes())
                _DIGESTS[("mnist",)] = h.hexdigest()
            return _DIGESTS[("mnist",)]
        files = _data_files(kind, arg)
        if not files and kind not in ("idx", "folder", "npz", "cifar10"):
            h.update(spec.encode())
            return h.hexdigest()
        key = (spec, *((label, str(f), (st := f.stat()).st_size, st.st_mtime_ns, st.st_ino) for label, f in files))
        if key not in _DIGESTS:
            for label, f in files:
                size, digest = _file_digest(f)
                h.update(f"{label}|{size}|".encode() + digest)
            _DIGESTS[key] = h.hexdigest()
        return _DIGESTS[key]
    except (OSError, EOFError, zlib.error) as e:  # a damaged gzip too
        raise DfkdError(spec, f"cannot read ({getattr(e, 'strerror', None) or e})") from None


def channel_moments(data, batch_size: int = 1000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a dataset's raw inputs (for ``normalize="auto"``), streamed."""
    s = s2 = None
    n = 0
    for xb, _ in as_batches(data, batch_size):
        x = xb.double().transpose(0, 1).reshape(xb.shape[1] if xb.dim() == 4 else 1, -1)
        s = x.sum(1) if s is None else s + x.sum(1)
        s2 = (x * x).sum(1) if s2 is None else s2 + (x * x).sum(1)
        n += x.shape[1]
    mean = s / n
    std = (s2 / n - mean * mean).clamp(min=1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def parse_normalize(text: str | None, data: DataSource) -> DataSource:
    """``none``, ``auto`` (per-channel moments of the training split) or ``MEAN/STD`` with
    comma-separated per-channel values (in the raw range, e.g. ``0.5,0.5,0.5/0.25,0.25,0.25``)."""
    if text in (None, "", "none"):
        return data
    if text == "auto":
        if data.train is None:
            raise DfkdError("normalize", "auto needs a training split")
        mean, std = channel_moments(data.train)
        data.origin["normalisation"] = "data"
    else:
        m, sep, s = text.partition("/")
        try:
            mean, std = tuple(float(v) for v in m.split(",")), tuple(float(v) for v in s.split(","))
        except ValueError:
            raise DfkdError("normalize", f"{text!r} is not none, auto or MEAN/STD (e.g. 0.5/0.25)") from None
        if not sep:
            raise DfkdError("normalize", f"{text!r} is not none, auto or MEAN/STD (e.g. 0.5/0.25)")
        data.origin["normalisation"] = "user"
    info = replace(data.info, mean=mean, std=std)
    info.check("normalize")
    return data.with_info(info)
