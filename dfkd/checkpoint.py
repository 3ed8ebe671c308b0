"""Atomic writes and the safe model format: weights in safetensors, description in JSON.

A model is two files, ``<name>.safetensors`` and ``<name>.json``. The JSON names how to
rebuild it (a registry name or the user's code spec, with arguments), so loading never runs
code that a file names: user code runs only when the user names it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__, faults
from .errors import DfkdError

if TYPE_CHECKING:
    from .data import DataInfo


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


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise DfkdError(path, f"{path.stat().st_size:,} bytes is larger than the {MAX_JSON_BYTES:,} dfkd reads")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DfkdError(path, "no such file") from None
    except IsADirectoryError:
        raise DfkdError(path, "is a directory, expected a JSON file") from None
    except OSError as e:
        raise DfkdError(path, f"cannot read ({e.strerror or e})") from None
    obj = parse_json(raw, path)
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
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DfkdError(path, "no such file") from None
    except IsADirectoryError:
        raise DfkdError(path, "is a directory, expected a .safetensors file") from None
    except OSError as e:
        raise DfkdError(path, f"cannot read ({e.strerror or e})") from None
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


MODEL_FORMAT, MODEL_VERSION = "dfkd-model", 2


def save_model(model: torch.nn.Module, path: str | os.PathLike, spec: str, args: dict[str, Any], info: "DataInfo",
               origin: dict | None = None, **extra: Any) -> Path:
    """Save ``model`` as ``<path>.safetensors`` + ``<path>.json``; returns the weights path.

    The JSON says how to rebuild the model (its spec and arguments, and for user code the
    sha256 of that code, never the code itself), the data it takes (``DataInfo``), the
    weights' sha256, and anything JSON-able in ``extra`` (accuracy, history, ...). ``origin`` (a
    ``DataSource.origin``) adds ``data.normalisation_origin``: ``data`` (``--normalize auto``: computed on
    the training data), ``user`` (``MEAN/STD``) or ``none``; files without it (older ones) still load.
    """
    base = Path(path).with_suffix("") if Path(path).suffix in (".safetensors", ".json") else Path(path)
    state = {k: v for k, v in model.state_dict().items()}
    desc = dict(extra, format=MODEL_FORMAT, version=MODEL_VERSION, dfkd_version=__version__,
                model={"spec": spec, "args": args, "code_sha256": _code_sha(spec)}, data=info.as_dict(),
                sha256=weights_sha256(state))
    if origin is not None:
        desc["data"]["normalisation_origin"] = origin.get("normalisation") or "none"
    weights = base.with_name(base.name + ".safetensors")
    raw = st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    if not (weights.is_file() and weights.stat().st_size == len(raw) and weights.read_bytes() == raw):
        atomic_write(weights, raw)  # a run killed between the two files left these very weights: kept
    write_json(base.with_name(base.name + ".json"), desc)
    return weights


def _code_sha(spec: str) -> str | None:
    from .models import code_sha256, is_code_spec
    return code_sha256(spec) if is_code_spec(spec) else None


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict into ``model``: a safetensors file, or a torch file read with
    ``weights_only=True`` (a state dict, or one under ``state_dict``/``model``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, _ = load_tensors(path)
    else:
        try:
            with warnings.catch_warnings():  # a damaged file's warnings would break the one-line answer
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DfkdError(path, "no such file") from None
        except pickle.UnpicklingError:  # weights_only refuses anything but tensors and plain containers
            raise DfkdError(path, "not a readable state dict: it holds objects other than tensors (read with "
                            "weights_only=True, so nothing in it ran)") from None
        except Exception as e:
            raise DfkdError(path, f"not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DfkdError(path, "holds no state dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DfkdError(path, f"weights hold NaN or infinite values ({', '.join(bad[:3])})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
        raise DfkdError(path, f"weights do not fit the model: {lines[1] if len(lines) > 1 else lines[0]}") from None
    return state


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _not_a_saved_model(path: Path) -> str:
    """What a weights file given where a saved dfkd model belongs holds, and what to pass instead. A
    PyTorch file is read with ``weights_only=True`` onto the meta device: nothing in it runs, and no
    tensor's data is read."""
    if not path.is_file():
        return "no such file"
    fix = f"pass the network's code and these weights: --teacher FILE.py:factory --weights {path.name}"
    if path.suffix == ".safetensors":
        return f"weights without the dfkd description beside them ({path.with_suffix('.json').name}); {fix}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses anything but tensors and plain containers
        return ("a pickled PyTorch object (e.g. a whole model saved with torch.save(model)), not a dfkd model; dfkd "
                f"does not unpickle objects (that could run code): save model.state_dict() instead, then {fix}")
    except Exception as e:
        return f"not a dfkd model, nor a PyTorch file dfkd can read ({type(e).__name__})"
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a PyTorch state dict (weights without the network's code), not a dfkd model; {fix}"
    return f"a PyTorch file holding a {type(obj).__name__}, not a dfkd model nor a state dict"


def _code_target(c: str) -> str:
    """A ``--code`` entry as a file or module (a full spec's factory dropped)."""
    return c.rpartition(":")[0] if ":" in c and not Path(c).exists() else c


def _trusted(spec: str, code: tuple[str, ...] | list[str]) -> bool:
    """Whether the user named the code a saved spec refers to (a file, or a module or its package)."""
    target = spec.rpartition(":")[0]
    for c in map(_code_target, code):
        if target.endswith(".py") and c.endswith(".py"):
            if Path(c).resolve() == Path(target).resolve() or Path(c).name == Path(target).name:
                return True
        elif c == target or target.startswith(c + "."):
            return True
    return False


def _named_code(spec: str, code: tuple[str, ...] | list[str]) -> str:
    """The spec with its file taken from the user's ``code`` entry (the file may have moved)."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        for c in map(_code_target, code):
            if c.endswith(".py") and Path(c).name == Path(target).name:
                return f"{c}:{attr}"
    return spec


def read_model_desc(path: str | os.PathLike) -> tuple[Path, Path, dict[str, Any]]:
    """A saved model's description, its path and its weights' path: a stem (``.json`` +
    ``.safetensors``, either given) or a published folder (``config.json`` + ``model.safetensors``,
    ``publishing``)."""
    from .publishing import read_config
    if Path(path).is_dir():
        return read_config(path)
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    desc_path = base.with_name(base.name + ".json")
    if Path(path).suffix in TORCH_SUFFIXES + (".safetensors",) and not desc_path.is_file():
        raise DfkdError(path, _not_a_saved_model(Path(path)))
    desc = read_json(desc_path)
    if desc.get("format") != MODEL_FORMAT:
        raise DfkdError(desc_path, "not a dfkd model description")
    if desc.get("version") == 1:  # arch + args of a registry network, MNIST-shaped
        shape = desc.get("input_shape", [1, 28, 28])
        desc = dict(desc, model={"spec": desc.get("arch"), "args": {}, "code_sha256": None},
                    data={"shape": shape, "num_classes": desc.get("num_classes", 10), "name": desc.get("dataset", "mnist")})
    elif desc.get("version") != MODEL_VERSION:
        raise DfkdError(desc_path, f"model format version {desc.get('version')!r} is not supported "
                        f"(this dfkd reads {MODEL_VERSION})")
    check_model_desc(desc_path, desc)
    return desc_path, base.with_name(base.name + ".safetensors"), desc


def check_model_desc(desc_path: Path, desc: dict) -> None:
    if not isinstance(desc.get("model"), dict) or not isinstance(desc["model"].get("spec"), str):
        raise DfkdError(desc_path, "no model spec: not a dfkd model description")


def load_model(path: str | os.PathLike, code: tuple[str, ...] | list[str] = ()) -> tuple[torch.nn.Module, dict, "DataInfo"]:
    """Load a model saved by ``save_model``: the network, its description and its data description.
    A model made from user code needs that code named in ``code`` (file paths or module names)."""
    from .data import DataInfo
    from .models import MODELS, build_model

    desc_path, weights, desc = read_model_desc(path)
    spec, args = desc["model"]["spec"], desc["model"].get("args") or {}
    if spec not in MODELS and not _trusted(spec, code):
        target = spec.rpartition(":")[0]
        raise DfkdError(desc_path, f"was made from user code {spec}; dfkd runs code only when you name it: "
                        f"add --code {target}")
    info = DataInfo.from_dict(desc.get("data"), desc_path)
    if not isinstance(args, dict):
        raise DfkdError(desc_path, "model args must be a JSON object")
    if spec in MODELS:  # declared sizes checked before anything is allocated: count on the meta device
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(spec, info, **args)[0].parameters())
        if weights.is_file() and n * 2 > weights.stat().st_size + 2 ** 20:
            raise DfkdError(desc_path, f"its arguments declare {n:,} parameters, more than {weights.name} holds")
    model, _ = build_model(_named_code(spec, code), info, **args)
    state = load_weights(model, weights)
    if desc.get("sha256") and weights_sha256(state) != desc["sha256"]:
        raise DfkdError(weights, f"weights do not match the sha256 in {desc_path.name} (tampered or mixed files)")
    model.eval()
    return model, desc, info


def resolve_model(ref: str, weights: str | None = None, args: dict | None = None, code: tuple[str, ...] = (),
                  info: "DataInfo | None" = None) -> tuple[torch.nn.Module, dict, "DataInfo"]:
    """A model as the command line names it: a saved dfkd model (stem or file), or a spec (registry
    name or code) built with ``args`` and, if given, ``weights`` loaded into it."""
    from .models import MODELS, build_model, is_code_spec
    from .publishing import locate

    ref = locate(ref)
    if ref in MODELS or (is_code_spec(ref) and not Path(ref).exists()):
        model, info = build_model(ref, info, **(args or {}))
        desc: dict[str, Any] = {"model": {"spec": ref, "args": args or {}, "code_sha256": _code_sha(ref)}}
        if weights:
            state = load_weights(model, weights)
            desc["sha256"] = weights_sha256(state)
        desc["data"] = info.as_dict()
        return model.eval(), desc, info
    if weights or args:
        raise DfkdError("weights", f"{ref} is a saved model: it brings its own weights and arguments")
    return load_model(ref, code)
