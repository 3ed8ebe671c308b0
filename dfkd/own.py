"""``dfkd run`` on a user's own teacher and student (``--teacher ... --student ...``): what the teacher offers
decides the objective, a given teacher's statistics file is read (never recorded) and checked against it, and
what makes an own pair's student goes into its resume settings."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import DataInfo
from .errors import DfkdError
from .kinds import default_kinds
from .metadata import Metadata
from .metadata import load as load_stats
from .models import batchnorms, code_sha256
from .objectives import OBJECTIVES, needs
from .profiles import Pair
from .run_config import RunConfig
from .specs import stats_path


def _spelt(info: DataInfo) -> str:
    return "none" if set(info.mean) == {0.0} and set(info.std) == {1.0} else \
        ",".join(f"{v:.9g}" for v in info.mean) + "/" + ",".join(f"{v:.9g}" for v in info.std)


def given_statistics(cfg: RunConfig, desc: dict, info: DataInfo) -> tuple[Metadata | None, Path]:
    """A given teacher's statistics file (``stats``, else beside the teacher or its weights) and its path; None
    where there is none. Refused in one line: a ``stats`` naming no file, a file recorded on another teacher, or
    on inputs normalised otherwise than this run normalises them (``normalize``)."""
    spath = Path(cfg.stats) if cfg.stats else stats_path(cfg.weights or cfg.teacher)
    if not spath.is_file():
        if cfg.stats:
            raise DfkdError(cfg.stats, "no such file")
        return None, spath
    meta = load_stats(spath)
    if meta.header.get("teacher_sha256") != desc.get("sha256"):
        raise DfkdError(spath, "recorded on another teacher (weights sha256 differs): give --stats with the file "
                        "recorded on this one")
    rec = meta.data
    same = len(rec.mean) == len(info.mean) and len(rec.std) == len(info.std) and all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(rec.mean + rec.std, info.mean + info.std))
    if not same:
        raise DfkdError("normalize", f"{spath} was recorded on inputs normalised by {_spelt(rec)}, and this run "
                        f"normalises them by {_spelt(info)}: give --normalize {_spelt(rec)}")
    return meta, spath


def offered(cfg: RunConfig, teacher: nn.Module, meta: Metadata | None, has_stats: bool,
            spath: Path | None, example: torch.Tensor | None = None) -> tuple[str, ...]:
    """An own pair's objectives: the ones asked for, else what the teacher offers: BatchNorm and statistics,
    ``all-layers+bn-stats``; BatchNorm alone, ``bn-stats``; statistics alone, ``all-layers``, with ``+norm-stats``
    where they hold LayerNorm / GroupNorm inputs (a teacher without BatchNorm that has such layers); neither, refused.
    A given file without an all-layers record serves the first objective its kinds do. ``has_stats``: a
    statistics file is given (``meta``), or the run records one (the default kinds, norm-stats where a forward pass
    of ``example``, a batch of the teacher's inputs, runs a LayerNorm or GroupNorm batch first)."""
    if cfg.objectives is not None:
        need = [o for o in cfg.objectives if needs(o)]
        if need and not has_stats:
            raise DfkdError("stats", f"{need[0]} needs the teacher's statistics file, and there is none at {spath}")
        norm = [o for o in cfg.objectives if "norm-stats" in needs(o)]
        if norm and meta is None and "norm-stats" not in default_kinds(teacher, example):
            raise DfkdError("objectives", f"{norm[0]}: norm-stats needs LayerNorm or GroupNorm layers that run on "
                            f"batch-first inputs, and {type(teacher).__name__} has none")
        return tuple(cfg.objectives)
    bn = bool(batchnorms(teacher))
    if not (bn or has_stats):
        raise DfkdError("stats", f"the teacher has no BatchNorm layer, so its statistics file is needed and there "
                        f"is none at {spath}: record one with dfkd record, or give --stats FILE")
    # the file's all-layers record, else the first objective its kinds serve (one the run records: all-layers)
    held = meta.kinds if meta is not None else list(default_kinds(teacher, example)) if has_stats else []
    stats = "all-layers" if "all-layers" in held else next((o for o, c in OBJECTIVES.items() if c.kind in held), None)
    if not bn and stats is None:
        raise DfkdError(spath, f"holds no statistic a metadata objective reads ({', '.join(held)})")
    if bn:
        return (f"{stats}+bn-stats",) if stats else ("bn-stats",)
    return (f"{stats}+norm-stats",) if "norm-stats" in held and stats != "norm-stats" else (stats,)


def own_settings(settings: dict, pair: Pair, cfg: RunConfig, desc: dict) -> dict:
    """A student's resume settings with what else makes an own pair's: the student's arguments and code, the
    teacher's spec, arguments and code, and the normalisation (a registry pair's settings stay as they were)."""
    if not pair.own:
        return settings
    model = desc.get("model") or {}
    return dict(settings, student_args=pair.student_args, student_code_sha256=code_sha256(pair.student),
                teacher_model={k: model.get(k) for k in ("spec", "args", "code_sha256")}, normalize=cfg.normalize)
