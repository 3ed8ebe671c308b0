"""What a statistics file reveals about the training data, measured before it is published.

The all-layers record of a layer that the input reaches through affine maps only (a first
Linear or Conv2d, after a flatten or the normalisation) stores each class's mean of
``s(x) = J x + s0``. Since ``E[s | c] = J E[x | c] + s0``, the least-squares solution
``J^+ (m_c - s0)`` is each class's *mean training input*, exactly when ``J`` has full column
rank (a 784->1200 Linear; a per-unit conv record), and its projection onto the row space of
``J`` when not (a per-channel conv record: one number per channel). A full covariance record
gives the class covariance of the inputs the same way, a diagonal one only its projections.

``invert`` finds such layers (``J`` is read column by column from the model, and affinity is
checked numerically), ``class_means`` computes the true class means from the data, and
``measure`` compares the two: per class the RMSE (raw units) and the share of the classes'
own structure recovered, ``R^2 = 1 - |m^ - m|^2 / |m - mbar|^2`` (1: exact; 0: no better than the
overall mean image; negative: worse). ``measure`` also scores any synthetic set the same way
(an attacker running dfkd's reconstruction on the published file), and how close its images lie
to training images compared with unseen test images (a membership signal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import DataInfo, as_batches
from .errors import DfkdError
from .metadata import Metadata
from .specs import DataRef, ModelRef
from .taps import resolve, tap

MAX_INPUT_DIM = 16384  # inputs larger than this are not inverted column by column


@dataclass
class Inversion:
    layer: str
    stat: str          # "unit" or "channel"
    rank: int          # rank of J: equal to the input dimension means the means are exact
    input_dim: int
    cov: str           # the layer's stored covariance: full (class covariances follow too), diag, lowrank
    means: torch.Tensor  # [C, *shape], raw units


class _Reached(Exception):
    """Raised by the hook once the tapped layer has run its last call: nothing after it is needed."""


def _stat(model: nn.Module, path: str, stat: str, x: torch.Tensor, calls: int = 0) -> tuple[torch.Tensor, int]:
    """The record's statistic of ``path`` for ``x`` as ``tap`` sees it (the layer's last call in the
    forward), and how many times the layer ran. Given ``calls``, the forward stops after that call."""
    got: dict[str, torch.Tensor] = {}
    ran = [0]

    def hook(_m, _inp, out):
        got["out"], ran[0] = out, ran[0] + 1
        if ran[0] == calls:
            raise _Reached

    handle = resolve(model, [path])[path].register_forward_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    out = got["out"]
    return (out.flatten(2).mean(2) if stat == "channel" else out.flatten(1)), ran[0]


def _solve(jac: torch.Tensor, rhs: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(rank of jac, min-norm least-squares solution of jac @ sol = rhs)`` from one gelsd call (an
    SVD): its cut-off, σ_max · max(m, n) · eps, is the one ``torch.linalg.matrix_rank`` uses."""
    res = torch.linalg.lstsq(jac, rhs, driver="gelsd")
    return int(res.rank), res.solution


def _affine_records(model: nn.Module, meta: Metadata):
    """``(layer header, J [dim, d], s(0) [1, dim])`` for every all-layers record affine in the input (float64)."""
    info = meta.data
    d = math.prod(info.shape)
    m = _float64(model)
    g = torch.Generator().manual_seed(0)
    for layer in meta.header["layers"]:
        path, stat = layer["path"], layer["stat"]
        x, y = (torch.randn((2, *info.shape), generator=g, dtype=torch.float64) for _ in range(2))
        zero, calls = _stat(m, path, stat, torch.zeros((1, *info.shape), dtype=torch.float64))
        s = lambda v: _stat(m, path, stat, v, calls)[0]  # noqa: E731  (a layer called twice: its last call)
        lhs, rhs = s(x + 0.5 * y) - zero, s(x) - zero + 0.5 * (s(y) - zero)
        if not torch.allclose(lhs, rhs, rtol=1e-6, atol=1e-8 * float(rhs.abs().max() + 1)):
            continue  # not affine in the input: a nonlinearity lies before this layer
        cols = [s(torch.eye(d, dtype=torch.float64)[i:i + 512].view(-1, *info.shape)) - zero for i in range(0, d, 512)]
        yield layer, torch.cat(cols).T, zero


@torch.no_grad()
def invert(model: nn.Module, meta: Metadata) -> list[Inversion]:
    """Class-mean inputs recovered from every all-layers record that is affine in the input."""
    if "all-layers" not in meta.kinds or math.prod(meta.data.shape) > MAX_INPUT_DIM:
        return []
    out = []
    for layer, jac, zero in _affine_records(model, meta):
        mean = meta.get("all-layers", "mean", layer["path"]).double()
        rank, sol = _solve(jac, (mean - zero).T)  # min-norm least squares
        raw = meta.data.to_raw(sol.T.float().view(-1, *meta.data.shape))
        out.append(Inversion(layer["path"], layer["stat"], rank, jac.shape[1], layer["cov"], raw))
    return out


@torch.no_grad()
def revealed_means(model: nn.Module, meta: Metadata) -> torch.Tensor | None:
    """Each class's mean input ``[C, *shape]`` (raw units) where the file gives it exactly: from
    the first all-layers record affine in the input whose ``J`` has full column rank; else None."""
    if "all-layers" not in meta.kinds or math.prod(meta.data.shape) > MAX_INPUT_DIM:
        return None
    for layer, jac, zero in _affine_records(model, meta):
        mean = meta.get("all-layers", "mean", layer["path"]).double()
        rank, sol = _solve(jac, (mean - zero).T)
        if rank == jac.shape[1]:
            return meta.data.to_raw(sol.T.float().view(-1, *meta.data.shape))
    return None


def _float64(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).cpu().double().eval()


def reveals(model: nn.Module, meta: Metadata) -> list[dict] | str:
    """What follows from ``meta`` in closed form, as ``record`` writes it into the header: per affine
    all-layers record its layer, form, and whether the class-mean inputs follow exactly."""
    if math.prod(meta.data.shape) > MAX_INPUT_DIM:
        return f"not measured (inputs of more than {MAX_INPUT_DIM} values)"
    exact = "exact up to the differential-privacy noise" if meta.header.get("privacy") else "exact"
    return [{"layer": i.layer, "stat": i.stat, "cov": i.cov, "rank": i.rank, "input_dim": i.input_dim,
             "class_means": (exact if i.rank == i.input_dim else f"projection of rank {i.rank}")}
            for i in invert(model, meta)]


@torch.no_grad()
def class_means(data, info: DataInfo, num_classes: int) -> torch.Tensor:
    """The true class means ``[C, *shape]`` of ``data`` in raw units (streamed)."""
    total = torch.zeros((num_classes, *info.shape), dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    for x, y in as_batches(data, 4096):
        total.index_add_(0, y, info.to_raw(x).double())
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


def measure(model: nn.Module, meta: Metadata, data, synthetic: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            test=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The leakage report of ``meta`` for ``model`` and the class images behind it. Analytic
    inversions are scored against ``data``'s true class means; so is each named synthetic set
    ``(raw inputs, labels)``, with its distance to training vs test inputs when ``test`` is given.
    The images: ``truth``, one per inverted layer (``inverted <layer> per <unit|channel>``), one per
    synthetic set (``[C, *shape]``, raw)."""
    info = meta.data
    truth = class_means(data, info, meta.num_classes)
    images = {"truth": truth}
    report: dict = {"inversions": [], "synthetic": {}}
    for inv in invert(model, meta):
        report["inversions"].append({"layer": inv.layer, "stat": inv.stat, "rank": inv.rank, "input_dim": inv.input_dim,
                                     "cov": inv.cov, "exact": inv.rank == inv.input_dim, **recovery(inv.means, truth)})
        images[f"inverted {inv.layer} per {inv.stat}"] = inv.means
    train_x = test_x = None
    if synthetic and test is not None:
        train_x = info.to_raw(next(as_batches(data, 10000))[0])
        test_x = info.to_raw(next(as_batches(test, 10000))[0])
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
    from .images import save_grid
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
    from .checkpoint import write_json
    from .metadata import load
    from .recording import stats_path
    from .specs import open_with_data
    from .synthetic import SyntheticSet

    model, desc, source = open_with_data(teacher, data)
    meta = load(stats or stats_path(teacher.ref), desc.get("sha256"))
    if source.train is None:
        raise DfkdError("data", "has no training split to compare with")
    sets = {}
    for d in synthetic:
        s = SyntheticSet(d).open()
        x, y, _ = s.load()
        sets[s.manifest.get("objective") or Path(d).name] = (s.info.to_raw(x), y)
    report, images = measure(model, meta, source.train, sets, source.test)
    report.update(stats=str(meta.path), kinds=meta.kinds, teacher=desc["model"]["spec"])
    out = Path(out)
    path = write_json(out.with_name(out.name + ".json"), report)
    if len(meta.data.shape) == 3:
        picture(out.with_name(out.name + ".png"), images, meta.data)
    return path, report
