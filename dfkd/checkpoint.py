"""Atomic writes and the safe model format: weights in safetensors, description in JSON.

A model is two files, ``<name>.safetensors`` and ``<name>.json``. The JSON names a
registry architecture and its arguments, so loading never runs code from the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .errors import DfkdError


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DfkdError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DfkdError(path, f"not valid JSON ({e})") from None
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
    try:
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, OverflowError) as e:
        raise DfkdError(path, f"not a valid safetensors file (truncated or corrupt: {e})") from None
    return tensors, meta


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of the weights themselves (names, dtypes, shapes, bytes), not of a file."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(model: torch.nn.Module, path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Save ``model`` as ``<path>.safetensors`` + ``<path>.json``; returns the weights path.

    ``info`` must hold ``arch`` and ``args`` (a registry entry) and may hold anything
    JSON-able (accuracy, input shape, ...). The weights' sha256 is added here.
    """
    base = Path(path).with_suffix("")
    state = {k: v for k, v in model.state_dict().items()}
    desc = dict(info, sha256=weights_sha256(state), dfkd_version=__version__,
                format="dfkd-model", version=1)
    weights = save_tensors(base.with_suffix(".safetensors"), state)
    write_json(base.with_suffix(".json"), desc)
    return weights


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model saved by ``save_model`` (given either file or the stem)."""
    from .models import build_model

    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    desc_path = base.with_suffix(".json")
    desc = read_json(desc_path)
    if desc.get("format") != "dfkd-model" or "arch" not in desc:
        raise DfkdError(desc_path, "not a dfkd model description (no 'arch')")
    model = build_model(desc["arch"], **desc.get("args", {}))
    state, _ = load_tensors(base.with_suffix(".safetensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DfkdError(base.with_suffix(".safetensors"),
                        f"weights do not fit {desc['arch']}: {first[1].strip() if len(first) > 1 else first[0]}") from None
    if desc.get("sha256") and weights_sha256(state) != desc["sha256"]:
        raise DfkdError(base.with_suffix(".safetensors"), "weights do not match the sha256 in the .json (tampered or mixed files)")
    model.eval()
    return model, desc
