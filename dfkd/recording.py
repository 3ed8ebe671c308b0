"""``dfkd record``: one streaming pass over the training set recording, per class, the
statistics each reconstruction objective needs: one loop over the records of the chosen kinds
(``kinds.REGISTRY``, each kind's own contract), exact or private.

- ``top-layer``: mean and covariance (as its Cholesky factor) of the logits / T;
- ``all-layers``: per chosen layer, mean and covariance of the pre-activation (the
  output of each Linear/Conv2d), full, diagonal (``std``) or low rank
  (``cov ~ F F^T + diag(r^2)``); ``auto`` is full up to 256 dimensions, else diagonal.
  A conv map's statistics are per channel by default (every position of a sample is a
  draw of the channel vector, as BatchNorm pools them: C dimensions, cheap to record),
  or per unit (``conv_stats="unit"``: C*H*W dimensions, as the paper's LeNet-5);
- ``spectral-all`` / ``spectral-pairs``: per-class mean and std of the kept
  graph-Fourier coefficients of the node signal (see ``graph`` and ``stats``) on one
  graph over all chosen layers, or on one graph per pair of adjacent layers;
- ``class-diag`` (not recorded by default): per chosen layer, mean and per-coordinate std of its output;
- ``norm-stats`` (by default for a teacher with LayerNorm / GroupNorm layers): each such layer's input per
  feature;
- ``token-positions`` (by default, not under privacy, for the token layers recorded per feature that are not
  affine in the input; named, for every such layer): each (token, feature)'s mean and std.

With ``privacy=EPSILON`` the same statistics come from clipped per-example contributions with
Gaussian noise (``privacy``): one more pass chooses the clip bounds the user did not give.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import distributed, privacy
from .accountant import check
from .config import RecordConfig, Runtime
from .data import (DataInfo, DataSource, as_batches, at_input, data_len, declared_range, described, first_batch,
                   info_of)
from .errors import DfkdError
from .files import exclusive, weights_sha256
from .forms import cov_mode
from .graph import LayerInfo, layer_infos
from .inversion import affine_in_input, reveals
from .kinds import KINDS, REGISTRY, Batch, Private, Record, Setup, default_kinds, gives_means, pooled_tokens
from .normstats import norm_layers
from .metadata import Metadata, load, new_header, save
from .models import device_of
from .privacy_report import PROTECTED, check_inputs, public_values
from .runtime import bars_off, pick_device, setup_threads, whole
from .specs import DataRef, ModelRef, open_with_data, stats_path
from .stats import SELECT_N
from .taps import default_layers, input_key, tap


__all__ = ["KINDS", "record", "record_file"]  # KINDS: the default kinds


def _records(kinds: list[str], s: Setup) -> list[Record]:
    """Every record of the chosen kinds, in registry order (each kind checks its settings first)."""
    chosen = [kind for name, kind in REGISTRY.items() if name in kinds]
    for kind in chosen:
        kind.check(s)
    return [r for kind in chosen for r in kind.records(s)]


def _positions(model: nn.Module, infos: list[LayerInfo], x0: torch.Tensor, named: bool) -> list[str]:
    """The token layers pooled per feature that get a token-positions record: every one where the kind is named,
    else those not affine in the input (whose per-position class means would give each class's mean input)."""
    pooled = pooled_tokens(infos)
    affine = set() if named or not pooled else set(affine_in_input(model, pooled, tuple(x0.shape[1:])))
    return [i.path for i in pooled if i.path not in affine]


def _check_batch(out: torch.Tensor, where: str, start: int) -> None:
    if not torch.isfinite(out.sum()):  # one reduction: any NaN or inf (or overflow) makes the sum non-finite
        raise DfkdError("data", f"NaN or infinite activations in {where} (batch starting at sample {start})")


def _batches(model: nn.Module, data, infos: list[LayerInfo], records: list[Record], c: int, cfg: RecordConfig,
             info: DataInfo | None, rt: Runtime, desc: str = "record"):
    """One streaming pass: ``(raw inputs, labels, logits, activations)`` per batch, labels and values checked;
    the model sees the inputs through ``info``'s normalisation; the records' ``inputs`` are tapped too."""
    dev, net = device_of(model), at_input(model, info)
    seen, inputs = 0, list(dict.fromkeys(p for r in records for p in r.inputs))
    with torch.no_grad(), tap(model, [i.path for i in infos], inputs=inputs) as acts, \
            tqdm(total=data_len(data), desc=desc, disable=bars_off(rt.progress), leave=False, unit="input") as bar:
        for xb, yb in as_batches(data, cfg.batch_size):
            yb = torch.as_tensor(yb).long().cpu()
            if len(yb) and (int(yb.min()) < 0 or int(yb.max()) >= c):
                raise DfkdError("data", f"labels must lie in [0, {c - 1}] for a model with {c} outputs")
            logits = net(xb.to(dev))
            _check_batch(logits, "the model's output", seen)
            for i in infos:
                _check_batch(acts[i.path], i.path, seen)
            for p in inputs:
                if input_key(p) not in acts or len(acts[input_key(p)]) != len(yb):
                    raise DfkdError("kinds", f"{p}'s input is not one row per input in this batch (it did not run, "
                                    "or it runs sequence-first): record without norm-stats (--kinds)")
                _check_batch(acts[input_key(p)], f"{p}'s input", seen)
            yield xb, yb, logits, acts
            seen += len(yb)
            bar.update(len(yb))
    if seen == 0:
        raise DfkdError("data", "holds no examples")


def _pass(model: nn.Module, data, infos: list[LayerInfo], records: list[Record], c: int, cfg: RecordConfig,
          info: DataInfo | None, rt: Runtime):
    """The exact pass: each record's rows streamed into its accumulator; class counts; per-channel range."""
    acc = {r.name: r.exact() for r in records}
    counts, lo, hi = torch.zeros(c, dtype=torch.long), None, None
    for xb, yb, logits, acts in _batches(model, data, infos, records, c, cfg, info, rt):
        flat = xb.transpose(0, 1).reshape(xb.shape[1], -1) if xb.dim() == 4 else xb.reshape(1, -1)
        lo = flat.amin(1) if lo is None else torch.minimum(lo, flat.amin(1))
        hi = flat.amax(1) if hi is None else torch.maximum(hi, flat.amax(1))
        counts += torch.bincount(yb, minlength=c)
        b = Batch(logits, acts, infos)
        for r in records:
            acc[r.name].update(r.rows(b), yb)
    if int(counts.min()) < 2:
        raise DfkdError("data", f"class {int(counts.argmin())} has {int(counts.min())} example(s); every class needs at least 2")
    return acc, counts, (lo, hi), {}


def _private_pass(model: nn.Module, data, infos: list[LayerInfo], records: list[Record], c: int,
                  cfg: RecordConfig, info: DataInfo, rt: Runtime):
    """The private passes (``privacy``) over the same records' rows: clip bounds chosen on noisy norm
    histograms where the user gave none (one pass), then clipped class sums (one pass), released with
    Gaussian noise; every record is an event of the budget."""
    by = {r.name: r for r in records}
    budget = privacy.Budget.new(cfg.privacy, cfg.delta, data_len(data), list(by), dict(cfg.clip), cfg.clip_quantile)

    def rows(b: Batch, names) -> dict[str, torch.Tensor]:
        return {r: by[r].released_rows(by[r].rows(b)) for r in names}

    if budget.to_choose:
        hists = {r: torch.zeros(privacy.CELLS, dtype=torch.long) for r in budget.to_choose}
        for _, yb, logits, acts in _batches(model, data, infos, records, c, cfg, info, rt,
                                                  "record: clip bounds"):
            out = rows(Batch(logits, acts, infos), budget.to_choose)  # only the records whose bound is chosen here
            for r in hists:
                hists[r] += privacy.histogram(privacy.norms(out[r]))
        budget.choose_bounds(hists)
    sums, counts = {}, torch.zeros(c, dtype=torch.long)
    for _, yb, logits, acts in _batches(model, data, infos, records, c, cfg, info, rt):
        counts += torch.bincount(yb, minlength=c)
        for r, x in rows(Batch(logits, acts, infos), list(by)).items():
            if r not in sums:
                sums[r] = privacy.ClippedMoments(c, x.shape[1], by[r].full, budget.bounds[r])
            sums[r].update(x, yb)
    noisy = budget.noisy_counts(counts)
    rel = {r: Private(budget.release(r, m, noisy), m, noisy) for r, m in sums.items()}
    lo = torch.full((info.shape[0] if len(info.shape) == 3 else 1,), info.low)
    return rel, noisy.long(), (lo, torch.full_like(lo, info.high)), budget.header()


def record(model: nn.Module, data, cfg: RecordConfig = RecordConfig(), info: DataInfo | None = None,
           rt: Runtime = Runtime()) -> Metadata:
    """Record the metadata of ``model`` on ``data``: a ``DataSource`` (its training split), a torch
    ``Dataset`` or ``DataLoader`` yielding ``(input, label)``, or an ``(x, y)`` pair of tensors.
    The inputs are raw; ``info`` describes them (their range, and the normalisation the model sees them
    through; a DataSource brings its own); without one they are the model's inputs as they are, the input shape
    comes from the data, the class count from the model, and the value range is the one seen
    (``cfg.value_range`` declares it instead). With privacy no value read off the examples goes into
    the header (``privacy_report``): the range must be declared where it would be read."""
    whole(rt, "record")
    origin = {"range": "caller", "normalisation": "caller"} if info is not None else {}
    fixed_range = isinstance(data, DataSource) and info is None and "range" not in data.origin  # the format's
    if isinstance(data, DataSource):
        origin = origin or dict(data.origin)
        info, data = info or data.info, data.train
    elif info is None and info_of(data) is not None:  # a source's split (or a loader over one): its description
        d = described(data)  # and where it came from (unknown: as if read off the data, refused under privacy)
        info = d.info
        origin = dict(getattr(d, "origin", None) or {"range": "data", **({} if info.plain else {"normalisation": "data"})})
    bad = [k for k in cfg.kinds or () if k not in REGISTRY]
    if bad or cfg.kinds == ():
        raise DfkdError("kinds", f"unknown kind(s) {bad or list(cfg.kinds)}; choose from {', '.join(REGISTRY)}")
    if not 0 < cfg.spectral_keep <= 1:
        raise DfkdError("spectral_keep", f"{cfg.spectral_keep} is not in (0, 1]")
    cov_mode(cfg.cov, 1)  # refuse a bad mode before the pass
    if cfg.privacy is not None:
        check(cfg.privacy, cfg.delta, cfg.clip_quantile)
        check_inputs(origin, cfg.value_range is not None, info)
    elif cfg.delta is not None or cfg.clip:
        raise DfkdError("--privacy", "delta and clip bounds need --privacy EPSILON")
    if info is not None and cfg.value_range is not None:
        declared = declared_range(info, cfg.value_range)
        if fixed_range and (declared.low, declared.high) != (info.low, info.high):  # reconstruction would clamp to it
            raise DfkdError("value_range", f"{declared.low:g},{declared.high:g} differs from this source's range, "
                            f"fixed by its format at {info.low:g}..{info.high:g} (8-bit values scaled to 0..1): "
                            f"give --range {info.low:g},{info.high:g} or leave it out")
        info = declared
    x0, _ = first_batch(data)
    dev = device_of(model)
    model.eval()
    x0 = info.to_model(x0) if info is not None else x0  # the network's view, for the layers' shapes
    infos = layer_infos(model, list(cfg.layers) if cfg.layers else default_layers(model), x0.to(dev), cfg.conv_stats,
                        cfg.token_stats, cfg.first_layer, named=bool(cfg.layers))
    with torch.no_grad():
        c = model(x0[:1].to(dev)).shape[1]
    norms = norm_layers(model, x0[:7].to(dev))  # the LayerNorm / GroupNorm layers that run, batch first
    named = cfg.kinds is not None
    kinds = list(dict.fromkeys(cfg.kinds if named else default_kinds(model, infos=infos, private=cfg.privacy is not None,
                                                                     norms=norms)))
    kept = _positions(model, infos, x0, named) if "token-positions" in kinds else []
    if not named and not kept and "token-positions" in kinds:
        kinds.remove("token-positions")
    t0 = time.perf_counter()
    layers = [dict(i.as_dict(), cov=cov_mode(cfg.cov, i.dim), **({"positions": True} if i.path in kept else {}))
              for i in infos]
    records = _records(kinds, Setup(model, infos, layers, cfg, c, norms))  # the spectral kinds' bases are made here
    basis_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if cfg.privacy is None:
        moments, counts, (lo, hi), private = _pass(model, data, infos, records, c, cfg, info, rt)
    else:
        if info is None and cfg.value_range is None:
            raise DfkdError("info", "with privacy, describe the inputs (a DataInfo with their range, or "
                            "value_range): a range read from the data is not private")
        info = info or declared_range(DataInfo(shape=tuple(x0.shape[1:]), num_classes=c, low=math.inf,
                                               high=-math.inf), cfg.value_range)  # nothing seen: any range holds it
        moments, counts, (lo, hi), private = _private_pass(model, data, infos, records, c, cfg, info, rt)
        private |= {"protected": dict(PROTECTED),
                    "public": public_values(origin, cfg.value_range is not None, cfg.delta is not None)}
    n = int(counts.sum())
    pass_s = time.perf_counter() - t1
    if info is None:
        info = DataInfo(shape=tuple(x0.shape[1:]), num_classes=c, low=float(lo.min()), high=float(hi.max()))
        info = declared_range(info, cfg.value_range) if cfg.value_range is not None else info
    if info.num_classes != c:
        raise DfkdError("data", f"{info.num_classes} classes, but the model gives {c} outputs")
    spectral = {"keep": cfg.spectral_keep, "operator": "laplacian D-A of |W| (bipartite per layer pair)",
                "conv_nodes": "per channel (a token sequence's: per feature), mean over positions", "select_n": SELECT_N, "pairs": []}
    if private:
        spectral["kept_by"] = "noisy energy (post-processing of the private sums)"
    fields = {"spectral": spectral}  # each kind writes its tensors, and its header fields here
    tensors: dict[str, torch.Tensor] = {"count": counts.to(torch.int64)}
    for r in records:
        tensors.update(REGISTRY[r.kind].write(r, moments[r.name], fields))
    tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
    header = new_header(
        kinds=kinds, num_classes=c, temperature=cfg.temperature, data=info.as_dict(),
        teacher_sha256=weights_sha256(model.state_dict()),
        recorded_on={"dataset": info.name, "n_samples": n, "per_class": counts.tolist(),
                     "sample_bytes": math.prod(info.shape), "input_min": lo.tolist(), "input_max": hi.tolist()},
        layers=layers, top={"path": "output", "dim": c}, privacy=private or None, **fields)
    meta = Metadata(header, tensors, timings={"basis_seconds": basis_s, "pass_seconds": pass_s})
    if gives_means(kinds):  # the file states what follows in closed form (dfkd.inversion)
        header["closed_form"] = reveals(model, meta)
    return meta


def record_file(teacher: ModelRef, data: DataRef, out: str | Path | None = None,
                cfg: RecordConfig = RecordConfig(), rt: Runtime = Runtime()) -> tuple[Path, Metadata]:
    """``dfkd record``: a teacher and its training data by name; the file is written atomically."""
    if out is None and teacher.is_spec:
        raise DfkdError("out", "needed when the teacher is a spec, not a saved model")
    if cfg.privacy is not None and data.normalize == "auto":  # refused before its pass over the data
        check_inputs({"normalisation": "data"}, cfg.value_range is not None)
    setup_threads()
    model, desc, source = open_with_data(teacher, data)
    model.to(pick_device(rt.device))
    if source.train is None:
        raise DfkdError("data", "has no training split to record on")
    out = Path(out) if out else stats_path(teacher.ref)
    ranks = distributed.group(rt.device)  # under torchrun rank 0 records (one pass), the others wait
    if not ranks.main:
        ranks.barrier()
        return out, load(out, desc.get("sha256"))
    with exclusive(out):
        meta = record(model, source, cfg, rt=rt)
        meta.header["teacher"] = desc["model"]["spec"]
        path = save(meta, out)
    ranks.barrier()
    return path, meta
