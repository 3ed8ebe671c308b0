"""``dfkd record``: one streaming pass over the training set recording, per class, the
statistics each reconstruction objective needs (see ``metadata.KINDS``).

- ``top_layer``: mean and covariance (as its Cholesky factor) of the logits / T;
- ``all_layers``: per chosen layer, mean and covariance of the pre-activation (the
  output of each Linear/Conv2d), full, diagonal (``std``) or low rank
  (``cov ~ F F^T + diag(r^2)``); ``auto`` is full up to 256 units, else diagonal;
- ``spectral_all`` / ``spectral_pairs``: per-class mean and std of the kept
  graph-Fourier coefficients of the node signal (see ``graph`` and ``stats``) on one
  graph over all chosen layers, or on one graph per pair of adjacent layers.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_model, weights_sha256
from .config import RecordConfig
from .data import ImageSet, load_mnist, to_input
from .errors import DfkdError
from .graph import LayerInfo, chain_basis, layer_infos, layer_signal
from .metadata import KINDS, Metadata, new_header, save
from .models import model_input_shape
from .runtime import pick_device, setup_threads
from .stats import SELECT_N, ClassMoments, SpectralMoments, cholesky_psd, low_rank
from .taps import default_layers, tap


def cov_mode(spec: str, units: int) -> str:
    if spec == "auto":
        return "full" if units <= 256 else "diag"
    if spec in ("full", "diag"):
        return spec
    if spec.startswith("lowrank:") and spec[8:].isdigit() and 0 < int(spec[8:]):
        return f"lowrank:{min(int(spec[8:]), units)}"
    raise DfkdError("--cov", f"{spec!r} is not auto, full, diag or lowrank:K")


def _graphs(model: nn.Module, infos: list[LayerInfo], kinds, keep: float, c: int) -> dict[str, tuple]:
    """name -> (layer infos, SpectralMoments, eigenvalues) for each graph the kinds need."""
    groups = {}
    if "spectral_all" in kinds:
        groups["spectral_all"] = infos
    if "spectral_pairs" in kinds:
        if len(infos) < 2:
            raise DfkdError("--layers", "spectral_pairs needs at least two layers")
        for a, b in zip(infos[:-1], infos[1:]):
            groups[f"spectral_pairs/{a.path}+{b.path}"] = [a, b]
    out = {}
    for name, members in groups.items():
        vals, vecs = chain_basis(model, members)
        out[name] = (members, SpectralMoments(vecs, c, keep), vals)
    return out


def _check_batch(out: torch.Tensor, where: str, start: int) -> None:
    if not torch.isfinite(out.sum()):  # one reduction: any NaN or inf (or overflow) makes the sum non-finite
        raise DfkdError("data", f"NaN or infinite activations in {where} (batch starting at sample {start})")


def _all_layer_tensors(m: ClassMoments, path: str, mode: str) -> dict[str, torch.Tensor]:
    t = {f"all_layers/{path}/mean": m.mean}
    cov = m.covariance()
    if mode == "full":
        t[f"all_layers/{path}/chol"] = cholesky_psd(cov)[0]
    elif mode == "diag":
        t[f"all_layers/{path}/std"] = cov.clamp(min=0).sqrt()
    else:
        factor, resid = low_rank(cov, int(mode.split(":")[1]))
        t[f"all_layers/{path}/factor"], t[f"all_layers/{path}/resid_std"] = factor, resid.sqrt()
    return t


def record(model: nn.Module, data: ImageSet | tuple[torch.Tensor, torch.Tensor], *, kinds=KINDS,
           layers: list[str] | None = None, cov: str = "auto", spectral_keep: float = 0.10,
           temperature: float = 8.0, batch_size: int = 1000, progress: bool = True) -> Metadata:
    """Record the metadata of ``model`` on ``data`` (an ImageSet's training split, or ``(x, y)``)."""
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise DfkdError("--kinds", f"unknown kind(s) {bad or kinds}; choose from {', '.join(KINDS)}")
    if not 0 < spectral_keep <= 1:
        raise DfkdError("--spectral-keep", f"{spectral_keep} is not in (0, 1]")
    shape = model_input_shape(model)
    x, y, name = (to_input(data.train_x, shape), data.train_y, data.name) if isinstance(data, ImageSet) \
        else (data[0], data[1], "custom")
    # the training set's own size, at one byte per value (uint8 images): what the metadata stands in for
    sample_bytes = data.train_x[0].numel() if isinstance(data, ImageSet) else x[0].numel()
    if len(x) != len(y):
        raise DfkdError("data", f"{len(x)} inputs but {len(y)} labels")
    dev = next(model.parameters()).device
    model.eval()
    infos = layer_infos(model, list(layers) if layers else default_layers(model), x[:2].to(dev))
    with torch.no_grad():
        c = model(x[:1].to(dev)).shape[1]
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise DfkdError("data", f"labels must lie in [0, {c - 1}] for a model with {c} outputs")
    t0 = time.perf_counter()
    modes = {i.path: cov_mode(cov, i.units) for i in infos}
    graphs = _graphs(model, infos, kinds, spectral_keep, c)
    basis_s = time.perf_counter() - t0
    top = ClassMoments(c, c, full=True)
    per_layer = {i.path: ClassMoments(c, i.units, full=modes[i.path] != "diag") for i in infos} \
        if "all_layers" in kinds else {}
    t1 = time.perf_counter()
    with torch.no_grad(), tap(model, [i.path for i in infos]) as acts:
        for s in tqdm(range(0, len(x), batch_size), desc="record", disable=not progress, leave=False):
            logits = model(x[s:s + batch_size].to(dev))
            yb = y[s:s + batch_size]
            _check_batch(logits, "the model's output", s)
            for i in infos:
                _check_batch(acts[i.path], i.path, s)
            if "top_layer" in kinds:
                top.update(logits / temperature, yb)
            for i in infos:
                if i.path in per_layer:
                    per_layer[i.path].update(acts[i.path].flatten(1), yb)
            if graphs:  # each layer's node signal once, shared by every graph it belongs to
                nodes = {i.path: layer_signal(acts[i.path], i).float().cpu() for i in infos}
                for members, sm, _ in graphs.values():
                    sm.update(torch.cat([nodes[m.path] for m in members], 1), yb)
    pass_s = time.perf_counter() - t1
    counts = torch.bincount(y, minlength=c)
    if int(counts.min()) < 2:
        raise DfkdError("data", f"class {int(counts.argmin())} has {int(counts.min())} example(s); every class needs at least 2")
    tensors: dict[str, torch.Tensor] = {"count": counts.to(torch.int64)}
    if "top_layer" in kinds:
        tensors["top_layer/mean"], tensors["top_layer/chol"] = top.mean, cholesky_psd(top.covariance())[0]
    for p, m in per_layer.items():
        tensors.update(_all_layer_tensors(m, p, modes[p]))
    spectral = {"keep": spectral_keep, "operator": "laplacian D-A of |W| (bipartite per layer pair)",
                "conv_nodes": "per channel, spatial mean", "select_n": SELECT_N, "pairs": []}
    for gname, (members, sm, vals) in graphs.items():
        sm.finish()
        g = {"name": gname.split("/", 1)[-1], "layers": [i.path for i in members],
             "nodes": int(sm.basis.shape[0]), "kept": int(sm.k)}
        tensors.update({f"{gname}/basis": sm.kept_basis, f"{gname}/eigvals": vals[sm.kept], f"{gname}/kept": sm.kept,
                        f"{gname}/mean": sm.moments.mean, f"{gname}/std": sm.moments.covariance().clamp(min=0).sqrt()})
        if gname == "spectral_all":
            spectral["all"] = g
        else:
            spectral["pairs"].append(g)
    tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
    header = new_header(
        kinds=kinds, num_classes=c, temperature=temperature, input_shape=list(shape),
        input_normalization=getattr(model, "normalization", {"mean": 0.0, "std": 1.0, "range": "pixels/255"}),
        teacher_sha256=weights_sha256(model.state_dict()), teacher_arch=getattr(model, "arch", type(model).__name__),
        recorded_on={"dataset": name, "n_samples": len(y), "per_class": counts.tolist(),
                     "sample_bytes": sample_bytes},
        layers=[dict(i.as_dict(), cov=modes[i.path]) for i in infos], top={"path": "output", "units": c},
        spectral=spectral)
    return Metadata(header, tensors, timings={"basis_seconds": basis_s, "pass_seconds": pass_s})


def stats_path(teacher: str | Path) -> Path:
    base = Path(teacher)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".stats.safetensors")


def record_file(cfg: RecordConfig) -> tuple[Path, Metadata]:
    """``dfkd record``: load a saved teacher and MNIST, record, write the file atomically."""
    setup_threads()
    model, _ = load_model(cfg.teacher)
    model.to(pick_device(cfg.device))
    meta = record(model, load_mnist(cfg.data_dir), kinds=cfg.kinds, layers=cfg.layers, cov=cfg.cov,
                  spectral_keep=cfg.spectral_keep, temperature=cfg.temperature, batch_size=cfg.batch_size,
                  progress=cfg.progress)
    out = Path(cfg.out) if cfg.out else stats_path(cfg.teacher)
    return save(meta, out), meta
