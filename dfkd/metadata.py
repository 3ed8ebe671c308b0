"""The publishable statistics file, ``<model>.stats.safetensors``: format, save, load, validate.

Tensors are named ``<kind>/<layer path>/<statistic>`` (``spectral_all/<statistic>`` and
``spectral_pairs/<a>+<b>/<statistic>`` for the graphs), class-major. The safetensors
string metadata holds one key, ``dfkd``, a JSON header: format and version, kinds,
layers with shapes and covariance modes, class count, input shape and normalisation,
the teacher's weights sha256, the data set and its per-class counts, the dfkd version,
and the sha256 of the tensors themselves (so tampering is detected). Nothing is pickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoint import load_tensors, save_tensors, weights_sha256
from .errors import DfkdError

FORMAT, VERSION = "dfkd-stats", 1
KINDS = ("top_layer", "all_layers", "spectral_all", "spectral_pairs")
RECORD_HINT = "dfkd record --teacher {teacher} --kinds {kind}"


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

    def require(self, kind: str, teacher: str = "TEACHER") -> None:
        if kind not in self.kinds:
            raise DfkdError(self.path or "stats", f"holds no {kind} statistics (it has {', '.join(self.kinds)}); "
                            f"add them with: {RECORD_HINT.format(teacher=teacher, kind=kind)}")

    def sizes(self) -> list[dict]:
        """One row per kind and record: floats and bytes stored."""
        rows = []
        for key, t in sorted(self.tensors.items()):
            kind, _, rest = key.partition("/")
            rows.append({"kind": kind if kind in KINDS else "shared", "record": rest or key,
                         "floats": t.numel(), "bytes": t.numel() * t.element_size()})
        return rows


def expected_shapes(h: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the header promises, with its shape."""
    c = int(h["num_classes"])
    out: dict[str, tuple[int, ...]] = {"count": (c,)}
    if "top_layer" in h["kinds"]:
        k = int(h["top"]["units"])
        out.update({"top_layer/mean": (c, k), "top_layer/chol": (c, k, k)})
    if "all_layers" in h["kinds"]:
        for layer in h["layers"]:
            p, d, mode = layer["path"], int(layer["units"]), layer["cov"]
            out[f"all_layers/{p}/mean"] = (c, d)
            if mode == "full":
                out[f"all_layers/{p}/chol"] = (c, d, d)
            elif mode == "diag":
                out[f"all_layers/{p}/std"] = (c, d)
            else:
                out[f"all_layers/{p}/factor"] = (c, d, int(mode.split(":")[1]))
                out[f"all_layers/{p}/resid_std"] = (c, d)
    spec = h.get("spectral", {})
    graphs = ([("spectral_all", spec["all"])] if "spectral_all" in h["kinds"] else []) + \
             ([(f"spectral_pairs/{g['name']}", g) for g in spec.get("pairs", [])] if "spectral_pairs" in h["kinds"] else [])
    for prefix, g in graphs:
        d, k = int(g["nodes"]), int(g["kept"])
        out.update({f"{prefix}/basis": (d, k), f"{prefix}/eigvals": (k,), f"{prefix}/kept": (k,),
                    f"{prefix}/mean": (c, k), f"{prefix}/std": (c, k)})
    return out


def save(meta: Metadata, path: str | Path) -> Path:
    header = dict(meta.header, tensors_sha256=weights_sha256(meta.tensors))
    return save_tensors(path, meta.tensors, {"dfkd": json.dumps(header, sort_keys=True)})


def _validate(path: Path, h: dict, tensors: dict[str, torch.Tensor]) -> None:
    if h.get("format") != FORMAT:
        raise DfkdError(path, f"not a dfkd statistics file (format {h.get('format')!r})")
    if h.get("version") != VERSION:
        raise DfkdError(path, f"format version {h.get('version')!r} is not supported (this dfkd reads {VERSION})")
    unknown = [k for k in h.get("kinds", []) if k not in KINDS]
    if unknown or not h.get("kinds"):
        raise DfkdError(path, f"unknown or missing kinds {unknown or h.get('kinds')}")
    try:
        want = expected_shapes(h)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DfkdError(path, f"header is incomplete ({type(e).__name__}: {e})") from None
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
    try:
        header = json.loads(raw["dfkd"])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise DfkdError(path, "no dfkd header: not a dfkd statistics file") from None
    if not isinstance(header, dict):
        raise DfkdError(path, "dfkd header is not a JSON object")
    _validate(path, header, tensors)
    if teacher_sha256 and header.get("teacher_sha256") != teacher_sha256 and not allow_other_teacher:
        raise DfkdError(path, "recorded on another teacher (weights sha256 differs); "
                        "pass --allow-other-teacher to use it anyway")
    return Metadata(header, tensors, path)


def new_header(**fields) -> dict:
    return {"format": FORMAT, "version": VERSION, "dfkd_version": __version__, **fields}


def summary(meta: Metadata) -> dict:
    """Sizes per kind and record, the total, and the ratio to the training images' size
    (uint8 pixels, e.g. MNIST's 60,000 x 28 x 28 = 47 MB)."""
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
