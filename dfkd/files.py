"""Files written so that no reader sees a part: atomic writes, run locks, the sweeping of temp files a
killed run left, and bounded reading of JSON and safetensors (any damage is one ``DfkdError``).

Every write of dfkd goes through ``atomic_write`` (a temp file in the same folder, then ``os.replace``);
``exclusive`` holds an output for one run. Nothing here knows what the files hold.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import faults
from .errors import DfkdError

TEMP_SUFFIX = ".dfkd-tmp"
_TEMP = re.compile(r"^\..+\.\d+\.[^.]+" + re.escape(TEMP_SUFFIX) + "$")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``: readers see
    the old file or the new one, never a part. The temp file is named ``.<name>.<pid>.<rand>.dfkd-tmp``
    and its writer holds an OS lock on it (``flock``) until it is renamed, so that one left by a
    killed process (whose lock the kernel released) can be told from one being written, and swept
    (``sweep_temps``)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f, tmp = _locked_temp(path)
        with f:  # open, and so locked, until the rename is done
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
            faults.point(path, replaced=False)
            os.replace(tmp, path)
            tmp = None
    except OSError as e:  # unwritable folder, full disk, file-size limit: nothing half-written is left
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise DfkdError(path, f"cannot write ({e.strerror or e})") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    faults.point(path, replaced=True)
    return path


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _locked_temp(path: Path, tries: int = 8):
    """A new temp file beside ``path``, open for writing and locked, and its name. A sweep may take
    a temp file in the instant between its creation and its lock; then the file is gone by the
    time the lock is ours (no link left), and another is made. On a file system without locks the
    file is written unlocked (a sweep keeps what it cannot lock)."""
    for _ in range(tries):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
        f = os.fdopen(fd, "wb")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return f, tmp
            f.close()
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            if os.fstat(fd).st_nlink > 0 and os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return f, tmp
        except FileNotFoundError:
            pass
        f.close()
    raise OSError(errno.EAGAIN, "temp files kept vanishing")


def _sweep_one(p: Path) -> bool:
    """Delete the temp file ``p`` if no process holds it (its writer died, and the kernel released
    its lock); the lock is held while the file is deleted. Whether it was."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone (renamed into place meanwhile), a link, or unreadable: not ours to judge
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.samestat(os.fstat(fd), os.stat(p, follow_symlinks=False)):
            return False
        p.unlink()
        return True
    except OSError:  # its writer holds it, or it went meanwhile
        return False
    finally:
        os.close(fd)


def sweep_temps(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete the temp files that ``atomic_write`` left in ``folder`` (and, if ``recursive``, in
    every folder below it) when its process was killed; returns how many. Only files named as
    ``atomic_write`` names them and held by no process are deleted."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = ".*" + TEMP_SUFFIX
    for p in folder.rglob(pattern) if recursive else folder.glob(pattern):
        if _TEMP.match(p.name) and p.is_file() and not p.is_symlink() and _sweep_one(p):
            n += 1
    return n


@contextlib.contextmanager
def exclusive(out: str | os.PathLike, folder: bool = False, tag: str = ""):
    """Hold the output ``out`` (a folder if ``folder``, else a file stem) for one run: a second run on
    it is refused in one line. The lock is an OS file lock (``filelock``), released by the kernel
    when its process dies, so a killed run's lock never blocks the next one. Once the lock is held,
    temp files a killed run left are swept: beside an output file, and anywhere below an output
    folder (``run`` writes its stages in sub-folders). ``tag`` names a share of the output (a rank's)."""
    out = Path(out)
    lock = out / f".dfkd{tag}.lock" if folder else out.with_name(f".{out.name}{tag}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fl = FileLock(str(lock), timeout=0)
        fl.acquire()
    except Timeout:
        raise DfkdError(out, f"another dfkd run is writing here (it holds {lock}); wait for it to finish "
                        "or stop it") from None
    except OSError as e:
        raise DfkdError(out, f"cannot write ({e.strerror or e})") from None
    try:
        sweep_temps(lock.parent, recursive=folder)
        yield out
    finally:
        fl.release()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


MAX_JSON_BYTES, MAX_JSON_DEPTH = 64 * 2 ** 20, 64
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def parse_json(text: str | bytes, where: object, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with bounded size and nesting depth (checked before parsing, so a hostile
    file cannot exhaust the stack or memory); any problem is one ``DfkdError``."""
    if len(text) > MAX_JSON_BYTES:
        raise DfkdError(where, f"JSON of {len(text):,} bytes is larger than the {MAX_JSON_BYTES:,} dfkd reads")
    try:
        text = text.decode() if isinstance(text, bytes) else text
    except UnicodeDecodeError as e:
        raise DfkdError(where, f"not valid JSON ({e})") from None
    depth = deepest = 0
    for ch in _STRING.sub("", text).translate(_BRACKETS):
        depth += 1 if ch in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > max_depth:
                raise DfkdError(where, f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise DfkdError(where, f"not valid JSON ({e})") from None


class _KeepBrackets(dict):
    def __missing__(self, ch: int) -> None:
        return None


_BRACKETS = _KeepBrackets({ord(c): c for c in "[]{}"})


def read_bytes(path: Path, expected: str, limit: int | None = None) -> bytes:
    """A file's bytes; missing, a directory, over ``limit`` or unreadable is a one-line ``DfkdError``."""
    try:
        if limit is not None and path.stat().st_size > limit:
            raise DfkdError(path, f"{path.stat().st_size:,} bytes is larger than the {limit:,} dfkd reads")
        return path.read_bytes()
    except FileNotFoundError:
        raise DfkdError(path, "no such file") from None
    except IsADirectoryError:
        raise DfkdError(path, f"is a directory, expected {expected}") from None
    except OSError as e:
        raise DfkdError(path, f"cannot read ({e.strerror or e})") from None


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    obj = parse_json(read_bytes(path, "a JSON file", MAX_JSON_BYTES), path)
    if not isinstance(obj, dict):
        raise DfkdError(path, "expected a JSON object")
    return obj


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, st_save(tensors, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file fully; any damage is a one-line ``DfkdError``."""
    path = Path(path)
    raw = read_bytes(path, "a .safetensors file")
    try:  # the library checks the declared offsets against the file's length before allocating
        tensors = st_load(raw)
    except (SafetensorError, ValueError, OverflowError, RuntimeError) as e:
        raise DfkdError(path, f"not a valid safetensors file (truncated or corrupt: {e})") from None
    header = parse_json(raw[8:8 + int.from_bytes(raw[:8], "little")], path)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise DfkdError(path, "its __metadata__ is not a map of strings")
    return tensors, meta or {}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of the weights themselves (names, dtypes, shapes, bytes), not of a file."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
