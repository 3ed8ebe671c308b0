"""What a statistics file reveals about the training data, measured before it is published.

The closed-form inversion (``inversion``) recovers each class's mean training input from an
all-layers (else class-diag) record of a layer affine in the input. ``class_means`` computes the true class means from
the data, and ``measure`` compares the two: per class the RMSE (raw units) and the share of the classes'
own structure recovered, ``R^2 = 1 - |m^ - m|^2 / |m - mbar|^2`` (1: exact; 0: no better than the
overall mean image; negative: worse). ``measure`` also scores any synthetic set the same way
(an attacker running dfkd's reconstruction on the published file), and how close its images lie
to training images compared with unseen test images (a membership signal).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .data import DataInfo, as_batches
from .errors import DfkdError
from .files import write_json
from .images import save_grid
from .inversion import invert
from .kinds import REGISTRY
from .metadata import Metadata, load
from .specs import DataRef, ModelRef, open_with_data, stats_path
from .synthetic import SyntheticSet
from .taps import MAPS


@torch.no_grad()
def class_means(data, info: DataInfo, num_classes: int) -> torch.Tensor:
    """The true class means ``[C, *shape]`` of ``data`` in raw units (streamed)."""
    total = torch.zeros((num_classes, *info.shape), dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    for x, y in as_batches(data, 4096):
        total.index_add_(0, y, x.double())
        count += torch.bincount(y, minlength=num_classes).double()
    if (count == 0).any():
        raise DfkdError("data", f"classes {(count == 0).nonzero().flatten().tolist()} have no examples")
    return (total / count.view(-1, *[1] * len(info.shape))).float()


def recovery(estimate: torch.Tensor, truth: torch.Tensor) -> dict:
    """Per class RMSE (raw units) and R^2 against the class-specific structure (see module doc)."""
    e, t = estimate.flatten(1).double(), truth.flatten(1).double()
    centred = t - t.mean(0, keepdim=True)
    r2 = 1 - ((e - t) ** 2).sum(1) / (centred ** 2).sum(1)
    rmse = ((e - t) ** 2).mean(1).sqrt()
    return {"rmse": float(rmse.mean()), "r2": float(r2.mean()), "r2_per_class": [round(float(v), 4) for v in r2],
            "rmse_per_class": [round(float(v), 4) for v in rmse]}


@torch.no_grad()
def nearest_gap(synthetic_raw: torch.Tensor, train_raw: torch.Tensor, test_raw: torch.Tensor) -> dict:
    """Mean distance from each synthetic input to its nearest training input and to its nearest
    test input (equal numbers of each): a ratio well below 1 means the synthetic inputs sit on
    the training examples themselves (memorised), not merely on their distribution."""
    n = min(len(train_raw), len(test_raw))
    s = synthetic_raw.flatten(1)

    def nn_dist(ref):
        return torch.cat([torch.cdist(s[i:i + 1024], ref[:n].flatten(1)).min(1).values for i in range(0, len(s), 1024)])
    d_train, d_test = nn_dist(train_raw), nn_dist(test_raw)
    return {"to_train": float(d_train.mean()), "to_test": float(d_test.mean()),
            "ratio": float(d_train.mean() / d_test.mean()), "n_reference": n}


def holds(meta: Metadata) -> list[str]:
    """What the file holds and so reveals, one line per kind (its registry line) and per chosen layer (its shape
    and the form of its statistics: a token sequence pooled over its tokens, a map over its positions)."""
    out = [f"{k}: {REGISTRY[k].reveals}" for k in meta.kinds if k in REGISTRY]
    for row in meta.header.get("layers", []):
        shape, stat, tokens = "x".join(map(str, row["shape"])), row.get("stat", "unit"), math.prod(row["shape"][:-1])
        kept = ("; token-positions keeps every (token, feature)'s mean and std" if row.get("positions") is True
                else " (where each token sits is not kept)")
        how = {"unit": f"every one of its {row['dim']:,} values (per unit)",
               "channel": f"its {row['dim']:,} channels, each pooled over the map's positions",
               "feature": f"its {row['dim']:,} features, each pooled over the sequence's {tokens:,} tokens{kept}"}[stat]
        if row["path"].endswith(MAPS) and stat == "feature":  # an attention's weights: a feature is a key token
            how = (f"the attention weight each of its {row['dim']:,} key tokens gets, pooled over the {tokens:,} query "
                   "tokens" + ("; token-positions keeps every (query, key) weight's mean and std"
                               if row.get("positions") is True else " (which query gave each weight is not kept)"))
        out.append(f"{row['path']} ({row['type']}, {shape}): {how}")
    return out


def measure(model: nn.Module, meta: Metadata, data, synthetic: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            test=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The leakage report of ``meta`` for ``model`` and the class images behind it: what the file holds
    (``holds``), then what is measured. Analytic
    inversions are scored against ``data``'s true class means; so is each named synthetic set
    ``(raw inputs, labels)``, with its distance to training vs test inputs when ``test`` is given.
    The images: ``truth``, one per inverted layer (``inverted <layer> per <unit|channel|feature>``), one per
    synthetic set (``[C, *shape]``, raw)."""
    info = meta.data
    truth = class_means(data, info, meta.num_classes)
    images = {"truth": truth}
    report: dict = {"holds": holds(meta), "inversions": [], "synthetic": {}}
    for inv in invert(model, meta):
        report["inversions"].append({"layer": inv.layer, "stat": inv.stat, "rank": inv.rank, "input_dim": inv.input_dim,
                                     "cov": inv.cov, "exact": inv.rank == inv.input_dim, **recovery(inv.means, truth)})
        images[f"inverted {inv.layer} per {inv.stat}"] = inv.means
    train_x = test_x = None
    if synthetic and test is not None:
        train_x = next(as_batches(data, 10000))[0]
        test_x = next(as_batches(test, 10000))[0]
    for name, (x, y) in (synthetic or {}).items():
        means = torch.stack([x[y == c].mean(0) if (y == c).any() else torch.zeros(info.shape)
                             for c in range(meta.num_classes)])
        row = recovery(means, truth)
        if train_x is not None:
            row["nearest"] = nearest_gap(x, train_x, test_x)
        report["synthetic"][name] = row
        images[name] = means
    return report, images


def picture(path: str | Path, images: dict[str, torch.Tensor], info: DataInfo) -> Path:
    """A PNG with one row per class and one column per named ``[C, *shape]`` set of class images."""
    if len(info.shape) != 3:
        raise DfkdError("out", f"inputs of shape {info.shape} are not images; no picture")
    sets = list(images.values())
    c = sets[0].shape[0]
    x = torch.stack(sets, 1).reshape(-1, *info.shape)  # class-major: class 0's sets, then class 1's, ...
    labels = torch.arange(c).repeat_interleave(len(sets))
    return save_grid(path, x, labels, per_class=len(sets), lo=info.low, hi=info.high)


def leakage_file(teacher: ModelRef, stats: str | Path | None, data: DataRef, out: str | Path,
                 synthetic: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """``dfkd leakage``: the report of a teacher's statistics file against its training data, written
    as ``<out>.json`` and (for images) ``<out>.png``: true class means beside what the file gives."""
    model, desc, source = open_with_data(teacher, data)
    meta = load(stats or stats_path(teacher.ref), desc.get("sha256"))
    if source.train is None:
        raise DfkdError("data", "has no training split to compare with")
    sets = {}
    for d in synthetic:
        s = SyntheticSet(d).open()
        x, y, _ = s.load()
        sets[s.manifest.get("objective") or Path(d).name] = (x, y)  # raw, as the data
    report, images = measure(model, meta, source.train, sets, source.test)
    report.update(stats=str(meta.path), kinds=meta.kinds, teacher=desc["model"]["spec"])
    out = Path(out)
    path = write_json(out.with_name(out.name + ".json"), report)
    if len(meta.data.shape) == 3:
        picture(out.with_name(out.name + ".png"), images, meta.data)
    return path, report
