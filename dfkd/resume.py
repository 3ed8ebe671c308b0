"""What a later run may resume from: files bound to a sha256, work bound to its settings.

- A stage's resume state (``<out>.state.safetensors``; ``run``'s ``state/*.safetensors``) is one
  safetensors file: the model's and the optimiser's tensors, and in its header the epoch, the
  history, the optimiser's other fields and the *settings* of the run that wrote it, with a sha256
  over tensors and that text (``content_sha256``; both in the header's one entry ``dfkd_checked``).
- A synthetic shard carries the same sha256 over its tensors and its record (``synthetic``), and
  the manifest lists it.
- A finished model's JSON holds the settings that made it (``settings``).

Settings are what changes the result (data, model and its starting weights, every hyperparameter,
the seed); how a run runs (device, progress bars, ranks) is not compared. A damaged file, or work
made with other settings, is refused in one line that says how to go on: delete it, or rerun with
``--restart``, which discards what is damaged or differs and starts that part over.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .averaging import Average
from .config import later_defaults, spelt_otherwise, to_dict
from .errors import DfkdError, OtherSettings
from .files import load_tensors, parse_json, read_json, save_tensors, weights_sha256

STATE_SUFFIX = ".state.safetensors"
STATE_FORMAT, STATE_VERSION = "dfkd-resume", 1
REMEDY = "delete it to start this stage over, or rerun with --restart"
UNCOMPARED = ("device", "progress")  # RunConfig's how-it-runs fields (the stages' are in config.Runtime)


def state_path(out: Path) -> Path:
    """The resume state of the output stem ``out``."""
    return out.with_name(out.name + STATE_SUFFIX)


def config_settings(cfg: Any) -> dict:
    """A stage's config as settings: every field but those in ``UNCOMPARED``."""
    return {k: v for k, v in to_dict(cfg).items() if k not in UNCOMPARED}


def canonical(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples as lists), so that settings compare as stored."""
    return json.loads(json.dumps(obj, sort_keys=True))


def differences(old: Any, new: Any, limit: int = 3) -> str:
    """The settings that differ, e.g. ``lr 0.001 -> 0.01, epochs 2 -> 3``, each with its flag where that is
    spelt otherwise (``n (--images) 2000 -> 3000``)."""
    return _said(_differing(old, new), limit)


def refusal(where: Any, made: str, old: Any, new: Any, remedy: str) -> OtherSettings:
    """The refusal of work ``made`` (``holds a ... made with``) under settings ``old`` where ``new`` are asked for:
    one line naming what differs and ``remedy``, and each ``(name, old, new)`` for its callers. Where the
    difference is only a setting one side holds and the other lacks (a later setting at its default, a null),
    which the callers' exact comparison refuses, that setting is named with the lacking side ``absent``
    (``None`` in the list)."""
    found = _differing(old, new) or _differing(old, new, exact=True)
    return OtherSettings(where, f"{made} other settings ({_said(found)}); {remedy}",
                         tuple((name, a, b) for name, a, b, _ in found))


def _said(found: list[tuple[str, Any, Any, str]], limit: int = 3) -> str:
    said = list(dict.fromkeys(text for *_, text in found))
    return ", ".join(said[:limit]) + (f" and {len(said) - limit} more" if len(said) > limit else "")


_ABSENT = object()  # a setting one side lacks, where no later default stands in for it


def _differing(old: Any, new: Any, exact: bool = False) -> list[tuple[str, Any, Any, str]]:
    """Each setting that differs: its name, old and new value (``None`` for a side that lacks it), and how a
    message says it. A setting one side lacks is read as its default where it was added later (the stages'
    ``later_defaults``; not where ``exact``, as an exact comparison sees it), else as absent."""
    found: list[tuple[str, Any, Any, str]] = []
    flags = spelt_otherwise()
    defaults, lacking = {} if exact else later_defaults(), _ABSENT

    def walk(a, b, name):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=lambda k: (k != "verb", str(k))):  # a side lacks k: its later
                walk(a.get(k, defaults.get(k, lacking)), b.get(k, defaults.get(k, lacking)), str(k))  # default
        elif a != b:
            said = f"{name}{f' ({flags[name]})' if name in flags else ''} {_short(a)} -> {_short(b)}"
            found.append((name, None if a is _ABSENT else a, None if b is _ABSENT else b, said))

    walk(canonical(old), canonical(new), "settings")
    return found


def _short(v: Any) -> str:
    if v is _ABSENT:
        return "absent"
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 40 else f"{s[:12]}...{s[-20:]}"


# --- checksums ----------------------------------------------------------------------------------
CHECKED = "dfkd_checked"  # the one header entry (one: the library writes a map's entries in no fixed order)


def content_sha256(tensors: dict[str, torch.Tensor], body: str) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes) and the header's text ``body``."""
    h = hashlib.sha256(weights_sha256(tensors).encode())
    h.update(body.encode())
    return h.hexdigest()


def save_checked(path: str | Path, tensors: dict[str, torch.Tensor], body: str) -> str:
    """``save_tensors`` with ``body`` (text, e.g. JSON) and its ``content_sha256`` in the header, as
    the one entry ``dfkd_checked``; returns the sha256."""
    sha = content_sha256(tensors, body)
    save_tensors(path, tensors, {CHECKED: json.dumps({"body": body, "sha256": sha}, sort_keys=True)})
    return sha


def verify(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], remedy: str) -> tuple[str, str]:
    """The header's body and sha256, once tensors and body match it; else one line ending in ``remedy``."""
    try:
        entry = json.loads(meta[CHECKED])
        body, sha = entry["body"], entry["sha256"]
        if not (isinstance(body, str) and isinstance(sha, str)):
            raise TypeError
    except (KeyError, TypeError, ValueError, RecursionError):
        raise DfkdError(path, f"damaged (its header holds no sha256); {remedy}") from None
    if content_sha256(tensors, body) != sha:
        raise DfkdError(path, f"damaged (sha256 mismatch); {remedy}")
    return body, sha


def load_checked(path: str | Path, remedy: str) -> tuple[dict[str, torch.Tensor], str]:
    """A file written by ``save_checked``: its tensors and body, verified; any damage is one line
    ending in ``remedy``."""
    try:
        tensors, meta = load_tensors(path)
    except DfkdError as e:
        raise DfkdError(e.where, f"damaged ({e.problem}); {remedy}") from None
    return tensors, verify(path, tensors, meta, remedy)[0]


# --- a stage's resume state ---------------------------------------------------------------------
def save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, history: list,
               settings: dict, average: Average | None = None) -> None:
    """Write the resume state after ``epoch`` epochs (atomically, sealed by its sha256), with the weights'
    ``average`` where one is being made."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update(average.tensors() if average is not None else {})
    osd, other = opt.state_dict(), {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v
            else:
                other.setdefault(str(pid), {})[k] = v
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "history": history,
           "param_groups": osd["param_groups"], "optim_other": other, "settings": settings}
    save_checked(path, tensors, json.dumps(doc, sort_keys=True))


def _read_state(path: Path, settings: dict) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors, body = load_checked(path, REMEDY)
    except DfkdError as e:
        raise DfkdError(e.where, f"cannot resume: {e.problem}") from None
    doc = parse_json(body, path)
    if not (isinstance(doc, dict) and doc.get("format") == STATE_FORMAT and doc.get("version") == STATE_VERSION
            and isinstance(doc.get("epoch"), int) and isinstance(doc.get("history"), list)
            and isinstance(doc.get("param_groups"), list) and isinstance(doc.get("optim_other"), dict)):
        raise DfkdError(path, f"cannot resume: not a dfkd resume state of this version; {REMEDY}")
    if doc.get("settings") != canonical(settings):
        raise refusal(path, "cannot resume: written by a run with", doc.get("settings"), settings, REMEDY)
    return tensors, doc


def load_state(path: Path | None, model: nn.Module, opt: torch.optim.Optimizer, settings: dict,
               restart: bool = False, average: Average | None = None) -> tuple[int, list]:
    """Load the resume state at ``path`` into ``model``, ``opt`` and the weights' ``average``: the epochs done and their
    history; ``(0, [])`` without one. A damaged state, or one written with other ``settings``, is
    refused, or with ``restart`` ignored (the first epoch then overwrites it); so is an old-format
    ``.pt`` state beside it (never read)."""
    if path is None:
        return 0, []
    if not path.is_file():
        legacy = path.with_suffix(".pt")  # <out>.state.pt, run's state/*.pt: never unpickled
        if legacy.is_file() and not restart:
            raise DfkdError(legacy, "an old-format resume state, which this dfkd no longer reads; delete it to start "
                            "this stage over, or rerun with --restart")
        return 0, []
    try:
        tensors, doc = _read_state(path, settings)
    except DfkdError:
        if restart:
            return 0, []
        raise
    state: dict[int, dict] = {}
    try:
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, pid, name = k.split("/", 2)
                state.setdefault(int(pid), {})[name] = v
        for pid, fields in doc["optim_other"].items():
            state.setdefault(int(pid), {}).update(fields)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
        opt.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
        if average is not None:
            average.load(tensors)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DfkdError(path, f"cannot resume: it does not fit this model ({type(e).__name__}); {REMEDY}") from None
    return doc["epoch"], doc["history"]


# --- finished outputs ---------------------------------------------------------------------------
DAMAGED_MODEL = "delete its .safetensors and .json to make it again, or rerun with --restart"


def _weights_verified(out: Path, desc: dict) -> bool:
    """Whether ``<out>.safetensors`` holds the weights whose sha256 the model's JSON ``desc`` gives."""
    try:
        tensors, _ = load_tensors(out.with_name(out.name + ".safetensors"))
    except DfkdError:
        return False
    return isinstance(desc.get("sha256"), str) and weights_sha256(tensors) == desc["sha256"]


def _state_done(state: Path | None, settings: dict) -> bool:
    """Whether ``state`` is an intact resume state of ``settings`` whose last epoch is done: a run
    killed while saving the model it holds (to be saved again, not redone)."""
    if state is None or not state.is_file():
        return False
    try:
        _, body = load_checked(state, REMEDY)
        doc = parse_json(body, state)
    except DfkdError:
        return False
    old = doc.get("settings") if isinstance(doc, dict) else None
    return (isinstance(old, dict) and all(old.get(k) == v for k, v in canonical(settings).items())
            and isinstance(doc.get("epoch"), int) and doc.get("epoch") == old.get("epochs"))


def finished(out: Path, settings: dict, restart: bool = False, state: Path | None = None) -> bool:
    """Whether the stem ``out`` holds a finished model made with ``settings`` (to keep, also with
    ``restart``): its weights verified against the sha256 in its JSON first. A damaged model (or
    weights and JSON of two runs, left by a kill while saving) is refused, unless the resume state
    ``state`` of these settings holds the finished run (it is saved again); one made with other (or
    unknown) settings is refused, unless ``state`` speaks for the run that replaces it. With
    ``restart`` both are taken as not there (made again)."""
    desc_path = out.with_name(out.name + ".json")
    if not desc_path.is_file():
        return False
    try:
        desc = read_json(desc_path)
    except DfkdError as e:
        if restart or _state_done(state, settings):
            return False
        raise DfkdError(e.where, f"{e.problem}; {DAMAGED_MODEL}") from None
    if not _weights_verified(out, desc):
        if restart or _state_done(state, settings):
            return False
        raise DfkdError(out.with_name(out.name + ".safetensors"), f"damaged, or not the weights {desc_path.name} "
                        f"describes (sha256 mismatch); {DAMAGED_MODEL}")
    old = desc.get("settings")
    if old == canonical(settings):
        return True
    if restart or (state is not None and state.is_file()):
        return False
    remedy = "choose another output, give the settings it was made with, or rerun with --restart to replace it"
    if not isinstance(old, dict):
        raise DfkdError(desc_path, f"holds a finished model made with unknown settings; {remedy}")
    raise refusal(desc_path, "holds a finished model made with", old, settings, remedy)


def check_finished(out: Path, settings: dict, restart: bool = False) -> bool:
    """``train``/``distill`` before they start: ``finished`` with the resume state beside the stem
    (``<out>.state.safetensors``; one beside a verified finished model of these settings is a
    leftover of a run killed after saving)."""
    return finished(out, settings, restart, state_path(out))
