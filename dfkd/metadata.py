"""The publishable statistics file, ``<model>.stats.safetensors``: the contract, save, load, validate.

The contract (``contract``) is the count plus each kind's own, declared by its entry in
``kinds.REGISTRY``, and read by ``record`` (which tensors to write), ``load`` (which to expect,
with their shapes) and the objectives (which to read, through the kind's ``read``). Kinds are
spelled as the objectives that use them.

Tensors are named ``<kind>/<part>/<statistic>``: ``top-layer/mean``,
``all-layers/<layer path>/chol``, ``spectral-all/basis``, ``spectral-pairs/<a>+<b>/std``;
per-class tensors are class-major. A class Gaussian is stored as its ``mean`` and one of
``chol`` (full covariance, as its Cholesky factor), ``std`` (diagonal) or ``factor`` +
``resid_std`` (low rank: ``cov ~ F F^T + diag(r^2)``), written and read by ``forms``.
The safetensors string metadata holds
one key, ``dfkd``, a JSON header: format and version, kinds, layers, class count, the data
description (input shape, normalisation, range, class names), the teacher's weights sha256,
the data set and its per-class counts, the dfkd version, and the sha256 of the tensors
themselves (so tampering is detected). Nothing is pickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import DataInfo
from .errors import DfkdError
from .files import load_tensors, parse_json, save_tensors, weights_sha256
from .forms import key
from .graph import TYPE_STATS, LayerInfo
from .kinds import KINDS, REGISTRY
from .version import __version__

__all__ = ["KINDS", "Metadata", "contract", "load", "new_header", "save", "summary"]  # KINDS: the default kinds
FORMAT, VERSION = "dfkd-stats", 2
RECORD_HINT = "dfkd record --teacher {teacher} --kinds {kind}"


def contract(h: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the header promises, with its shape: the count and each kind's own (``kinds``)."""
    out: dict[str, tuple[int, ...]] = {"count": (int(h["num_classes"]),)}
    for name, kind in REGISTRY.items():
        if name in h["kinds"]:
            out.update(kind.contract(h))
    return out


@dataclass
class Metadata:
    header: dict
    tensors: dict[str, torch.Tensor]
    path: Path | None = None
    timings: dict = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return list(self.header["kinds"])

    @property
    def num_classes(self) -> int:
        return int(self.header["num_classes"])

    @property
    def data(self) -> DataInfo:
        return DataInfo.from_dict(self.header["data"], self.path or "stats")

    def get(self, kind: str, stat: str, part: str | None = None) -> torch.Tensor:
        return self.tensors[key(kind, stat, part)]

    def gaussian(self, kind: str, part: str | None = None) -> dict[str, torch.Tensor]:
        """A part's class Gaussian: ``mean`` and its ``chol``, ``std`` or ``factor`` + ``resid_std``."""
        return REGISTRY[kind].read(self, part)

    def require(self, kind: str, teacher: str = "TEACHER") -> None:
        if kind not in self.kinds:
            raise DfkdError(self.path or "stats", f"holds no {kind} statistics (it has {', '.join(self.kinds)}); "
                            f"add them with: {RECORD_HINT.format(teacher=teacher, kind=kind)}")

    def sizes(self) -> list[dict]:
        """One row per kind and record: floats and bytes stored."""
        rows = []
        for name, t in sorted(self.tensors.items()):
            kind, _, rest = name.partition("/")
            rows.append({"kind": kind if kind in REGISTRY else "shared", "record": rest or name,
                         "floats": t.numel(), "bytes": t.numel() * t.element_size()})
        return rows


def save(meta: Metadata, path: str | Path) -> Path:
    header = dict(meta.header, tensors_sha256=weights_sha256(meta.tensors))
    return save_tensors(path, meta.tensors, {"dfkd": json.dumps(header, sort_keys=True)})


# the header's fields that readers use, with their types (checked before anything reads them)
_FIELDS = {"num_classes": int, "kinds": list, "layers": list, "teacher_sha256": str, "recorded_on": dict, "data": dict}
_LAYER = {"path": str, "type": str, "shape": list, "nodes": int, "stat": str, "cov": str, "dim": int}
_NORM = {"path": str, "type": str, "features": int}
_RECORDED = {"dataset": str, "n_samples": int}
_PRIVACY = {"neighbouring": str, "mechanism": str, "accountant": str, "accountant_version": str, "covers": str,
            "clip_bounds": dict, "events": list}
_NAMES = {int: "an integer", list: "a list", str: "a string", dict: "an object"}


def _check_fields(path: Path, h: dict) -> None:
    def check(where: str, obj, fields: dict) -> None:
        if not isinstance(obj, dict):
            raise DfkdError(path, f"header field {where} is not an object")
        for k, t in fields.items():
            if not isinstance(obj.get(k), t) or isinstance(obj.get(k), bool):
                raise DfkdError(path, f"header field {where}.{k} is missing or not {_NAMES[t]}")
    check("header", h, _FIELDS)
    check("recorded_on", h["recorded_on"], _RECORDED)
    for i, layer in enumerate(h["layers"]):
        check(f"layers[{i}]", layer, _LAYER)
        allowed = TYPE_STATS.get(layer["type"], ())
        if layer["stat"] not in allowed:
            raise DfkdError(path, f"header field layers[{i}] is a {layer['type']!r} layer with stat {layer['stat']!r} "
                            f"(a linear layer's is unit, a conv map's unit or channel, a token sequence's unit or feature)")
        if len(layer["shape"]) == 0 or not all(isinstance(v, int) and v > 0 for v in layer["shape"]) or \
                layer["dim"] != LayerInfo.from_dict(layer).dim:
            raise DfkdError(path, f"header field layers[{i}].dim {layer['dim']} does not follow from its shape "
                            f"{layer['shape']} and stat {layer['stat']!r}")
    marked = [i for i, layer in enumerate(h["layers"]) if "positions" in layer]
    if any(h["layers"][i]["positions"] is not True or (h["layers"][i]["type"], h["layers"][i]["stat"]) !=
           ("token", "feature") for i in marked) or ("token-positions" in h["kinds"]) != bool(marked):
        raise DfkdError(path, "header field layers[].positions must be true on token layers recorded per feature, "
                        "and on at least one exactly when kinds has token-positions")
    norms = h.get("norms", [])
    if not isinstance(norms, list) or ("norm-stats" in h["kinds"]) != bool(norms):
        raise DfkdError(path, "header field norms must list the norm layers exactly when kinds has norm-stats")
    for i, n in enumerate(norms):
        check(f"norms[{i}]", n, _NORM)
        if n["type"] not in ("LayerNorm", "GroupNorm") or n["features"] <= 0:
            raise DfkdError(path, f"header field norms[{i}] is not a LayerNorm or GroupNorm of a positive size")
    if len({n["path"] for n in norms}) != len(norms):
        raise DfkdError(path, "header field norms names a layer twice")
    if h.get("privacy") is not None:
        p = h["privacy"]
        check("privacy", p, _PRIVACY)
        for k in ("epsilon", "delta", "target_epsilon"):
            if k == "target_epsilon" and k not in p:
                continue
            if not isinstance(p.get(k), (int, float)) or isinstance(p[k], bool) or not p[k] > 0:
                raise DfkdError(path, f"header field privacy.{k} is missing or not a positive number")
        for i, e in enumerate(p["events"]):
            check(f"privacy.events[{i}]", e, {"release": str})
            if not all(isinstance(e.get(k), (int, float)) for k in ("share", "sensitivity", "noise_multiplier", "sigma")):
                raise DfkdError(path, f"header field privacy.events[{i}] lacks its numbers")
        for r, b in p["clip_bounds"].items():
            check(f"privacy.clip_bounds.{r}", b, {"by": str})
            if not isinstance(b.get("bound"), (int, float)):
                raise DfkdError(path, f"header field privacy.clip_bounds.{r}.bound is not a number")
    if not all(isinstance(k, str) for k in h["kinds"]):
        raise DfkdError(path, "header field kinds must list names")


def _validate(path: Path, h: dict, tensors: dict[str, torch.Tensor]) -> None:
    if h.get("format") != FORMAT:
        raise DfkdError(path, f"not a dfkd statistics file (format {h.get('format')!r})")
    if h.get("version") != VERSION:
        raise DfkdError(path, f"format version {h.get('version')!r} is not supported (this dfkd reads {VERSION}; "
                        "record the statistics again)")
    _check_fields(path, h)
    unknown = [k for k in h["kinds"] if k not in REGISTRY]
    if unknown or not h["kinds"]:
        raise DfkdError(path, f"unknown or missing kinds {unknown or h['kinds']}")
    try:
        want = contract(h)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise DfkdError(path, f"header is incomplete ({type(e).__name__}: {e})") from None
    DataInfo.from_dict(h.get("data"), path)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise DfkdError(path, f"tensors do not match the header (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise DfkdError(path, f"{k} has shape {tuple(tensors[k].shape)}, header implies {shape}")
        if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise DfkdError(path, f"{k} holds NaN or infinite values")
    if weights_sha256(tensors) != h.get("tensors_sha256"):
        raise DfkdError(path, "tensor contents do not match the header's sha256 (the file was altered)")


def load(path: str | Path, teacher_sha256: str | None = None, allow_other_teacher: bool = False) -> Metadata:
    """Read and validate a statistics file; refuse one recorded on another teacher."""
    path = Path(path)
    tensors, raw = load_tensors(path)
    if "dfkd" not in raw:
        raise DfkdError(path, "no dfkd header: not a dfkd statistics file")
    header = parse_json(raw["dfkd"], path)
    if not isinstance(header, dict):
        raise DfkdError(path, "dfkd header is not a JSON object")
    _validate(path, header, tensors)
    if teacher_sha256 and header.get("teacher_sha256") != teacher_sha256:
        if not allow_other_teacher:
            raise DfkdError(path, "recorded on another teacher (weights sha256 differs); "
                            "pass --allow-other-teacher to use it anyway")
        header["teacher_sha256"] = teacher_sha256
    return Metadata(header, tensors, path)


def new_header(**fields) -> dict:
    return {"format": FORMAT, "version": VERSION, "dfkd_version": __version__, **fields}


def summary(meta: Metadata) -> dict:
    """Sizes per kind and record, the total, and the ratio to the training inputs' size
    (one byte per value, e.g. MNIST's 60,000 x 28 x 28 = 47 MB)."""
    rows = meta.sizes()
    per_kind: dict[str, dict] = {}
    for r in rows:
        k = per_kind.setdefault(r["kind"], {"floats": 0, "bytes": 0})
        k["floats"] += r["floats"]
        k["bytes"] += r["bytes"]
    total = sum(r["bytes"] for r in rows)
    rec = meta.header["recorded_on"]
    train_bytes = rec["n_samples"] * rec["sample_bytes"] if rec.get("sample_bytes") else None
    return {"rows": rows, "per_kind": per_kind, "total_bytes": total,
            "total_floats": sum(r["floats"] for r in rows), "train_bytes": train_bytes,
            "ratio": total / train_bytes if train_bytes else None}
