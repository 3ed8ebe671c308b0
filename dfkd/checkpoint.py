"""The saved model formats: weights in safetensors, description in JSON, never code.

A model is two files, ``<name>.safetensors`` and ``<name>.json``, or a published folder
(``config.json`` + ``model.safetensors`` beside ``stats.safetensors`` and a model card; written by
``publishing``). The JSON names how to rebuild it (a registry name or the user's code spec, with
arguments), so loading never runs code that a file names: user code runs only when the user names it.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from .data import DataInfo
from .errors import DfkdError
from .files import atomic_write, load_tensors, read_json, weights_sha256, write_json
from .models import MODELS, build_model, code_sha256
from .version import __version__

MODEL_FORMAT, MODEL_VERSION = "dfkd-model", 2


def save_model(model: torch.nn.Module, path: str | os.PathLike, spec: str, args: dict[str, Any], info: DataInfo,
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
                model={"spec": spec, "args": args, "code_sha256": code_sha256(spec)}, data=info.as_dict(),
                sha256=weights_sha256(state))
    if origin is not None:
        desc["data"]["normalisation_origin"] = origin.get("normalisation") or "none"
    weights = base.with_name(base.name + ".safetensors")
    raw = st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    if not (weights.is_file() and weights.stat().st_size == len(raw) and weights.read_bytes() == raw):
        atomic_write(weights, raw)  # a run killed between the two files left these very weights: kept
    write_json(base.with_name(base.name + ".json"), desc)
    return weights


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


def load_model(path: str | os.PathLike, code: tuple[str, ...] | list[str] = ()) -> tuple[torch.nn.Module, dict, DataInfo]:
    """Load a model saved by ``save_model``: the network, its description and its data description.
    A model made from user code needs that code named in ``code`` (file paths or module names)."""
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


# the published folder (``publishing`` writes it): its format and its files
FOLDER_FORMAT, FOLDER_VERSION = "dfkd-folder", 1
CONFIG, WEIGHTS, STATS, CARD = "config.json", "model.safetensors", "stats.safetensors", "README.md"


def is_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a published folder (it holds a ``config.json``)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read_config(folder: str | os.PathLike) -> tuple[Path, Path, dict]:
    """A published folder's ``config.json`` (checked), its path and the weights' path."""
    folder = Path(folder)
    missing = [f for f in (CONFIG, WEIGHTS, STATS) if not (folder / f).is_file()]
    if missing:  # a folder `dfkd train --out` wrote holds models by their stems (``<folder>/teacher``): named
        held = _models_in(folder) if CONFIG in missing else []
        held_said = "" if not held else f"; it holds the trained model {held[0]}: pass that instead" if len(held) == 1 \
            else f"; it holds the trained models {', '.join(held)}: pass one of them instead"
        raise DfkdError(folder, f"not a complete dfkd model folder (missing {', '.join(missing)}){held_said}")
    desc = read_json(folder / CONFIG)
    if desc.get("format") != FOLDER_FORMAT:
        raise DfkdError(folder / CONFIG, f"not a dfkd model folder's config (format {desc.get('format')!r})")
    if not isinstance(desc.get("version"), int) or desc["version"] > FOLDER_VERSION:
        raise DfkdError(folder / CONFIG, f"folder format version {desc.get('version')!r} is newer than this dfkd reads "
                        f"({FOLDER_VERSION}); upgrade dfkd")
    check_model_desc(folder / CONFIG, desc)
    return folder / CONFIG, folder / WEIGHTS, desc


def _models_in(folder: Path) -> list[str]:
    """The stems of the trained models (``<stem>.json`` of format dfkd-model beside its weights) in ``folder``."""
    found = []
    for j in sorted(folder.glob("*.json")):
        try:
            model = j.with_suffix(".safetensors").is_file() and read_json(j).get("format") == MODEL_FORMAT
        except (DfkdError, AttributeError):  # unreadable, or not an object: not a model
            model = False
        if model:
            found.append(str(j.with_suffix("")))
    return found


def stats_of(folder: str | os.PathLike) -> Path:
    """The statistics file of a published folder."""
    return Path(folder) / STATS
