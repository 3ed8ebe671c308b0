"""``dfkd record``: one streaming pass over the training set recording, per class, the
statistics each reconstruction objective needs (see ``metadata.KINDS``).

- ``top-layer``: mean and covariance (as its Cholesky factor) of the logits / T;
- ``all-layers``: per chosen layer, mean and covariance of the pre-activation (the
  output of each Linear/Conv2d), full, diagonal (``std``) or low rank
  (``cov ~ F F^T + diag(r^2)``); ``auto`` is full up to 256 dimensions, else diagonal.
  A conv map's statistics are per channel by default (every position of a sample is a
  draw of the channel vector, as BatchNorm pools them: C dimensions, cheap to record),
  or per unit (``conv_stats="unit"``: C*H*W dimensions, as the paper's LeNet-5);
- ``spectral-all`` / ``spectral-pairs``: per-class mean and std of the kept
  graph-Fourier coefficients of the node signal (see ``graph`` and ``stats``) on one
  graph over all chosen layers, or on one graph per pair of adjacent layers.

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
from .config import RecordConfig
from .data import DataInfo, DataSource, as_batches, data_len, declared_range, first_batch
from .errors import DfkdError
from .files import exclusive, weights_sha256
from .graph import LayerInfo, chain_basis, layer_infos, layer_signal
from .inversion import reveals
from .metadata import KINDS, Metadata, cov_mode, gaussian_tensors, key, load, new_header, save
from .models import device_of
from .privacy_report import PROTECTED, check_inputs, public_values
from .runtime import pick_device, setup_threads
from .specs import DataRef, ModelRef, open_with_data, stats_path
from .stats import ClassMoments, SELECT_N, SpectralMoments
from .taps import default_layers, tap


def _graphs(model: nn.Module, infos: list[LayerInfo], kinds, keep: float, c: int) -> dict[str, tuple]:
    """name -> (layer infos, SpectralMoments, eigenvalues) for each graph the kinds need."""
    groups = {}
    if "spectral-all" in kinds:
        groups["spectral-all"] = infos
    if "spectral-pairs" in kinds:
        if len(infos) < 2:
            raise DfkdError("layers", "spectral-pairs needs at least two layers")
        for a, b in zip(infos[:-1], infos[1:]):
            groups[f"spectral-pairs/{a.path}+{b.path}"] = [a, b]
    out = {}
    for name, members in groups.items():
        vals, vecs = chain_basis(model, members)
        out[name] = (members, SpectralMoments(vecs, c, keep), vals)
    return out


def _check_batch(out: torch.Tensor, where: str, start: int) -> None:
    if not torch.isfinite(out.sum()):  # one reduction: any NaN or inf (or overflow) makes the sum non-finite
        raise DfkdError("data", f"NaN or infinite activations in {where} (batch starting at sample {start})")


def _batches(model: nn.Module, data, infos: list[LayerInfo], c: int, cfg: RecordConfig, desc: str = "record"):
    """One streaming pass: ``(inputs, labels, logits, activations)`` per batch, labels and values checked."""
    dev = device_of(model)
    seen = 0
    with torch.no_grad(), tap(model, [i.path for i in infos]) as acts, \
            tqdm(total=data_len(data), desc=desc, disable=not cfg.progress, leave=False, unit="input") as bar:
        for xb, yb in as_batches(data, cfg.batch_size):
            yb = torch.as_tensor(yb).long().cpu()
            if len(yb) and (int(yb.min()) < 0 or int(yb.max()) >= c):
                raise DfkdError("data", f"labels must lie in [0, {c - 1}] for a model with {c} outputs")
            logits = model(xb.to(dev))
            _check_batch(logits, "the model's output", seen)
            for i in infos:
                _check_batch(acts[i.path], i.path, seen)
            yield xb, yb, logits, acts
            seen += len(yb)
            bar.update(len(yb))
    if seen == 0:
        raise DfkdError("data", "holds no examples")


def _layer_rows(out: torch.Tensor, i: LayerInfo) -> torch.Tensor:
    """A layer's output as its record's rows: ``[N, D]``, or ``[N, C, H*W]`` for a conv map per channel."""
    return out.flatten(2) if i.stat == "channel" else out.flatten(1)


def _pass(model: nn.Module, data, infos: list[LayerInfo], kinds, graphs: dict, c: int, cfg: RecordConfig):
    """The exact pass: class moments of the logits, layers and node signals; per-channel range."""
    top = ClassMoments(c, c, full=True)
    per_layer = {i.path: ClassMoments(c, i.dim, full=cov_mode(cfg.cov, i.dim) != "diag") for i in infos} \
        if "all-layers" in kinds else {}
    counts, lo, hi = torch.zeros(c, dtype=torch.long), None, None
    for xb, yb, logits, acts in _batches(model, data, infos, c, cfg):
        flat = xb.transpose(0, 1).reshape(xb.shape[1], -1) if xb.dim() == 4 else xb.reshape(1, -1)
        lo = flat.amin(1) if lo is None else torch.minimum(lo, flat.amin(1))
        hi = flat.amax(1) if hi is None else torch.maximum(hi, flat.amax(1))
        counts += torch.bincount(yb, minlength=c)
        if "top-layer" in kinds:
            top.update(logits / cfg.temperature, yb)
        for i in infos:
            if i.path in per_layer:
                per_layer[i.path].update(_layer_rows(acts[i.path], i), yb)
        if graphs:  # each layer's node signal once, shared by every graph it belongs to
            nodes = {i.path: layer_signal(acts[i.path], i).float().cpu() for i in infos}
            for members, sm, _ in graphs.values():
                sm.update(torch.cat([nodes[m.path] for m in members], 1), yb)
    if int(counts.min()) < 2:
        raise DfkdError("data", f"class {int(counts.argmin())} has {int(counts.min())} example(s); every class needs at least 2")
    spectra = {}
    for gname, (members, sm, vals) in graphs.items():
        sm.finish()
        spectra[gname] = (members, sm.basis.shape[0], sm.kept, sm.kept_basis, vals[sm.kept],
                          sm.moments.mean, sm.moments.covariance())
    return top, per_layer, spectra, counts, (lo, hi), {}


def _private_pass(model: nn.Module, data, infos: list[LayerInfo], kinds, graphs: dict, c: int,
                  cfg: RecordConfig, info: DataInfo):
    """The private passes (``privacy``): clip bounds chosen on noisy norm histograms where the user gave
    none (one pass), then clipped class sums (one pass), released with Gaussian noise."""
    records: dict = {}  # record name -> (rows of a batch, full covariance?)
    if "top-layer" in kinds:
        records["top-layer"] = (lambda lg, acts, nodes: lg / cfg.temperature, True)
    if "all-layers" in kinds:
        for i in infos:
            records[f"all-layers/{i.path}"] = (
                lambda lg, acts, nodes, i=i: _layer_rows(acts[i.path], i), cov_mode(cfg.cov, i.dim) != "diag")
    for gname, (members, sm, _) in graphs.items():
        records[gname] = (lambda lg, acts, nodes, m=members, b=sm.basis.float():
                          torch.cat([nodes[x.path] for x in m], 1) @ b, False)
    budget = privacy.Budget.new(cfg.privacy, cfg.delta, data_len(data), list(records), dict(cfg.clip),
                                cfg.clip_quantile)

    def rows(acts, logits, names):
        nodes = {i.path: layer_signal(acts[i.path], i).float().cpu() for i in infos} \
            if any(n in graphs for n in names) else {}
        return {r: records[r][0](logits, acts, nodes) for r in names}

    if budget.to_choose:
        hists = {r: torch.zeros(privacy.CELLS, dtype=torch.long) for r in budget.to_choose}
        for _, yb, logits, acts in _batches(model, data, infos, c, cfg, "record: clip bounds"):
            out = rows(acts, logits, budget.to_choose)  # only the records whose bound is chosen here
            for r in hists:
                hists[r] += privacy.histogram(privacy.norms(out[r]))
        budget.choose_bounds(hists)
    sums, counts = {}, torch.zeros(c, dtype=torch.long)
    for _, yb, logits, acts in _batches(model, data, infos, c, cfg):
        counts += torch.bincount(yb, minlength=c)
        for r, x in rows(acts, logits, list(records)).items():
            if r not in sums:
                sums[r] = privacy.ClippedMoments(c, x.shape[1], records[r][1], budget.bounds[r])
            sums[r].update(x, yb)
    noisy = budget.noisy_counts(counts)
    rel = {r: budget.release(r, m, noisy) for r, m in sums.items()}
    spectra = {}
    for gname, (members, sm, vals) in graphs.items():
        energy = sums[gname].second.sum(0) / noisy.sum()  # noisy: post-processing of the released sums
        kept = torch.argsort(energy, descending=True)[: sm.k].sort().values
        spectra[gname] = (members, sm.basis.shape[0], kept, sm.basis[:, kept], vals[kept],
                          rel[gname].mean[:, kept], rel[gname].cov[:, kept])
    per_layer = {i.path: rel[f"all-layers/{i.path}"] for i in infos} if "all-layers" in kinds else {}
    lo = torch.full((info.shape[0] if len(info.shape) == 3 else 1,), info.low)
    return rel.get("top-layer"), per_layer, spectra, noisy.long(), (lo, torch.full_like(lo, info.high)), \
        budget.header()


def record(model: nn.Module, data, cfg: RecordConfig = RecordConfig(), info: DataInfo | None = None) -> Metadata:
    """Record the metadata of ``model`` on ``data``: a ``DataSource`` (its training split), a torch
    ``Dataset`` or ``DataLoader`` yielding ``(input, label)``, or an ``(x, y)`` pair of tensors.
    ``info`` describes the inputs (a DataSource brings its own); without one the input shape
    comes from the data, the class count from the model, and the value range is the one seen
    (``cfg.value_range`` declares it instead). With privacy no value read off the examples goes into
    the header (``privacy_report``): the range must be declared where it would be read."""
    origin = {"range": "caller", "normalisation": "caller"} if info is not None else {}
    fixed_range = isinstance(data, DataSource) and info is None and "range" not in data.origin  # the format's
    if isinstance(data, DataSource):
        origin = origin or dict(data.origin)
        info, data = info or data.info, data.train
    kinds = list(dict.fromkeys(cfg.kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise DfkdError("kinds", f"unknown kind(s) {bad or kinds}; choose from {', '.join(KINDS)}")
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
    infos = layer_infos(model, list(cfg.layers) if cfg.layers else default_layers(model), x0.to(dev), cfg.conv_stats)
    with torch.no_grad():
        c = model(x0[:1].to(dev)).shape[1]
    t0 = time.perf_counter()
    graphs = _graphs(model, infos, kinds, cfg.spectral_keep, c)
    basis_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if cfg.privacy is None:
        top, per_layer, spectra, counts, (lo, hi), private = _pass(model, data, infos, kinds, graphs, c, cfg)
    else:
        if info is None and cfg.value_range is None:
            raise DfkdError("info", "with privacy, describe the inputs (a DataInfo with their range, or "
                            "value_range): a range read from the data is not private")
        info = info or declared_range(DataInfo(shape=tuple(x0.shape[1:]), num_classes=c, low=math.inf,
                                               high=-math.inf), cfg.value_range)  # nothing seen: any range holds it
        top, per_layer, spectra, counts, (lo, hi), private = _private_pass(model, data, infos, kinds, graphs, c,
                                                                           cfg, info)
        private |= {"protected": dict(PROTECTED),
                    "public": public_values(origin, cfg.value_range is not None, cfg.delta is not None)}
    n = int(counts.sum())
    pass_s = time.perf_counter() - t1
    if info is None:
        info = DataInfo(shape=tuple(x0.shape[1:]), num_classes=c, low=float(lo.min()), high=float(hi.max()))
        info = declared_range(info, cfg.value_range) if cfg.value_range is not None else info
    if info.num_classes != c:
        raise DfkdError("data", f"{info.num_classes} classes, but the model gives {c} outputs")
    tensors: dict[str, torch.Tensor] = {"count": counts.to(torch.int64)}
    if "top-layer" in kinds:
        tensors.update(gaussian_tensors("top-layer", None, top, "full"))
    for p, m in per_layer.items():
        tensors.update(gaussian_tensors("all-layers", p, m, cov_mode(cfg.cov, m.mean.shape[1])))
    spectral = {"keep": cfg.spectral_keep, "operator": "laplacian D-A of |W| (bipartite per layer pair)",
                "conv_nodes": "per channel, spatial mean", "select_n": SELECT_N, "pairs": []}
    if private:
        spectral["kept_by"] = "noisy energy (post-processing of the private sums)"
    for gname, (members, nodes, kept, basis, vals, mean, var) in spectra.items():
        kind, _, part = gname.partition("/")
        g = {"name": part or "all", "layers": [i.path for i in members], "nodes": int(nodes), "kept": len(kept)}
        stats = {"basis": basis, "eigvals": vals, "kept": kept, "mean": mean, "std": var.clamp(min=0).sqrt()}
        tensors.update({key(kind, s, part or None): v for s, v in stats.items()})
        if part:
            spectral["pairs"].append(g)
        else:
            spectral["all"] = g
    tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
    header = new_header(
        kinds=kinds, num_classes=c, temperature=cfg.temperature, data=info.as_dict(),
        teacher_sha256=weights_sha256(model.state_dict()),
        recorded_on={"dataset": info.name, "n_samples": n, "per_class": counts.tolist(),
                     "sample_bytes": math.prod(info.shape), "input_min": lo.tolist(), "input_max": hi.tolist()},
        layers=[dict(i.as_dict(), cov=cov_mode(cfg.cov, i.dim)) for i in infos], top={"path": "output", "dim": c},
        spectral=spectral, privacy=private or None)
    meta = Metadata(header, tensors, timings={"basis_seconds": basis_s, "pass_seconds": pass_s})
    if "all-layers" in kinds:  # the file states what follows from it in closed form (dfkd.inversion)
        header["closed_form"] = reveals(model, meta)
    return meta


def record_file(teacher: ModelRef, data: DataRef, out: str | Path | None = None,
                cfg: RecordConfig = RecordConfig()) -> tuple[Path, Metadata]:
    """``dfkd record``: a teacher and its training data by name; the file is written atomically."""
    if out is None and teacher.is_spec:
        raise DfkdError("out", "needed when the teacher is a spec, not a saved model")
    if cfg.privacy is not None and data.normalize == "auto":  # refused before its pass over the data
        check_inputs({"normalisation": "data"}, cfg.value_range is not None)
    setup_threads()
    model, desc, source = open_with_data(teacher, data)
    model.to(pick_device(cfg.device))
    if source.train is None:
        raise DfkdError("data", "has no training split to record on")
    out = Path(out) if out else stats_path(teacher.ref)
    ranks = distributed.group(cfg.device)  # under torchrun rank 0 records (one pass), the others wait
    if not ranks.main:
        ranks.barrier()
        return out, load(out, desc.get("sha256"))
    with exclusive(out):
        meta = record(model, source, cfg)
        meta.header["teacher"] = desc["model"]["spec"]
        path = save(meta, out)
    ranks.barrier()
    return path, meta
