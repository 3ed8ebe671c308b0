"""The statistic kinds ``dfkd record`` stores, one registry entry each (``REGISTRY``): a kind owns its
contract. Each entry declares

- ``records``: what it records, as *records*: one per stored Gaussian (the top layer, a layer, a graph),
  each with its rows of a batch ``[N, D]`` (a conv map per channel, a token sequence per feature: ``[N, D, P]``), whether it keeps a
  full covariance or a diagonal, and its exact accumulator. The exact pass streams the rows into that
  accumulator; the private pass (``privacy``) clips the same rows per example and sums them with noise
  (sensitivity: ``C`` for the sum and ``C^2`` for the second moment, full or diagonal, under the
  record's clip bound ``C``; every record is counted by the accountant). A kind prepares what its
  records need (the spectral kinds: their graphs' Laplacian bases) when it makes them;
- ``contract``: the tensors a header promises, with their shapes (``metadata.contract`` is their union);
- ``write``: its tensors from a record's exact moments or its private release, and its header fields
  (``header_fields``, each with a status in ``privacy_report.HEADER_FIELDS``);
- ``read``: its stored tensors, as the objectives read them;
- ``reveals``: a line on what the kind reveals of the training data (``dfkd inspect``, the model card);
  ``layer_means``: it stores each chosen layer's class means (``inversion`` solves them for the class-mean
  inputs where a layer is affine in the input);
- ``form`` (the layer kinds: a layer's stored form) and ``graphs`` (the spectral kinds: the graphs a header
  declares), declared on ``Kind`` for the callers that reach them through the registry; another kind raises.

``KINDS`` are the paper's four, recorded by default; ``default_kinds`` adds norm-stats and token-positions where
the teacher has what they record; ``REGISTRY`` holds every kind.
A class Gaussian is stored in one of the forms of ``forms``.
"""
from __future__ import annotations

import math

import torch

from . import forms
from .errors import DfkdError
from .graph import LayerInfo, chain_basis, layer_rows
from .normstats import features, norm_layers, norm_rows
from .records import Batch, Kind, Private, Record, Setup, Shapes
from .stats import ClassMoments, SpectralMoments
from .taps import input_key

__all__ = ["KINDS", "REGISTRY", "default_kinds", "pooled_tokens", "positions", "Batch", "Kind", "Private", "Record",
           "Setup", "Shapes", "means_kind", "means_kinds", "entry_kind", "gives_means"]

class TopLayer(Kind):
    """Per class, mean and full covariance (its Cholesky factor) of the logits / T."""
    name = "top-layer"
    reveals = "each class's mean and covariance of the teacher's logits (its soft outputs on the training data)"
    header_fields = ("temperature", "top.*")

    def records(self, s):
        t, c = s.cfg.temperature, s.c
        return [Record(self.name, None, "full", lambda b: b.logits / t, lambda: ClassMoments(c, c, full=True))]

    def contract(self, h):
        c = int(h["num_classes"])
        return {forms.key(self.name, st): shape for st, shape in forms.shapes("full", c, c).items()}


class _Layers(Kind):
    """Per chosen layer, a class Gaussian of its output (a conv map per channel pools its positions)."""
    layer_means = True
    header_fields = ("layers[].*",)

    def records(self, s):
        out = []
        for i, layer in zip(s.infos, s.layers):
            mode = self.form(layer)
            out.append(Record(self.name, i.path, mode, lambda b, i=i: layer_rows(b.acts[i.path], i),
                              lambda i=i, full=mode != "diag": ClassMoments(s.c, i.dim, full=full)))
        return out

    def contract(self, h):
        c, out = int(h["num_classes"]), {}
        for layer in h["layers"]:
            for st, shape in forms.shapes(self.form(layer), c, int(layer["dim"])).items():
                out[forms.key(self.name, st, layer["path"])] = shape
        return out


class AllLayers(_Layers):
    """Per chosen layer, mean and covariance of its output: full, diagonal or low rank (``--cov``)."""
    name = "all-layers"
    reveals = ("each class's mean (and covariance) of every chosen layer's output; where a layer is affine in "
               "the input, each class's mean training input in closed form")

    def form(self, layer):
        return layer["cov"]


class ClassDiag(_Layers):
    """Per chosen layer, mean and per-coordinate std of its output: all-layers without the cross terms
    (under privacy a diagonal second moment: ``D`` noisy entries per class, not ``D (D + 1) / 2``)."""
    name = "class-diag"
    reveals = ("each class's mean and per-coordinate std of every chosen layer's output; where a layer is "
               "affine in the input, each class's mean training input in closed form")
    default = False

    def form(self, layer):
        return "diag"


class _Spectral(Kind):
    """Per graph, per class mean and std of the kept graph-Fourier coefficients of the node signal."""
    header_fields = ("spectral.*",)

    def groups(self, infos: list[LayerInfo]) -> list[tuple[str | None, list[LayerInfo]]]:
        raise NotImplementedError

    def records(self, s):
        out = []
        for part, members in self.groups(s.infos):
            vals, vecs = chain_basis(s.model, members)  # the kind's preparation: its graph's Laplacian basis
            sm = SpectralMoments(vecs, s.c, s.cfg.spectral_keep)
            out.append(Record(self.name, part, "diag", lambda b, m=members: torch.cat([b.node(x.path) for x in m], 1),
                              lambda sm=sm: sm, lambda x, b=sm.basis.float(): x @ b, (members, sm, vals)))
        return out

    def contract(self, h):
        c, out = int(h["num_classes"]), {}
        for part, g in self.graphs(h):
            d, k = int(g["nodes"]), int(g["kept"])
            out.update({forms.key(self.name, st, part): shape for st, shape in
                        {"basis": (d, k), "eigvals": (k,), "kept": (k,), "mean": (c, k), "std": (c, k)}.items()})
        return out

    def write(self, rec, m, header):
        members, sm, vals = rec.own
        if isinstance(m, Private):  # kept by their noisy energy: post-processing of the released sums
            energy = m.sums.second.sum(0) / m.counts.sum()
            kept = torch.argsort(energy, descending=True)[: sm.k].sort().values
            basis, mean, var = sm.basis[:, kept], m.mean[:, kept], m.covariance()[:, kept]
        else:
            sm.finish()
            kept, basis, mean, var = sm.kept, sm.kept_basis, sm.moments.mean, sm.moments.covariance()
        g = {"name": rec.part or "all", "layers": [i.path for i in members], "nodes": int(sm.basis.shape[0]),
             "kept": len(kept)}
        if rec.part:
            header["spectral"]["pairs"].append(g)
        else:
            header["spectral"]["all"] = g
        stats = {"basis": basis, "eigvals": vals[kept], "kept": kept, "mean": mean, "std": var.clamp(min=0).sqrt()}
        return {forms.key(self.name, st, rec.part): v for st, v in stats.items()}


class SpectralAll(_Spectral):
    name = "spectral-all"
    reveals = "each class's mean and std of the kept graph-Fourier coefficients of the whole network's node signal"

    def graphs(self, h):
        return [(None, h.get("spectral", {})["all"])] if self.name in h["kinds"] else []

    def groups(self, infos):
        return [(None, infos)]


class SpectralPairs(_Spectral):
    name = "spectral-pairs"
    reveals = "each class's mean and std of the kept graph-Fourier coefficients of each adjacent layer pair's signal"

    def graphs(self, h):
        return [(g["name"], g) for g in h.get("spectral", {})["pairs"]] if self.name in h["kinds"] else []

    def check(self, s):
        if len(s.infos) < 2:
            raise DfkdError("layers", "spectral-pairs needs at least two layers")

    def groups(self, infos):
        return [(f"{a.path}+{b.path}", [a, b]) for a, b in zip(infos[:-1], infos[1:])]


class NormStats(Kind):
    """Per LayerNorm / GroupNorm of the teacher (``normstats``), per class, each feature's mean and std of the
    layer's input pooled over its positions (tokens): what BatchNorm's running statistics keep, recorded. Not
    among the paper's four; ``dfkd record`` adds it by default for a teacher that has such layers (``default_kinds``)."""
    name = "norm-stats"
    reveals = "each class's per-feature mean and std of every LayerNorm and GroupNorm layer's input"
    header_fields = ("norms[].*",)
    default = False

    def check(self, s):
        if not s.norms:
            raise DfkdError("kinds", f"norm-stats needs LayerNorm or GroupNorm layers that run on batch-first inputs, "
                            f"and {type(s.model).__name__} has none")

    def records(self, s):
        return [Record(self.name, p, "diag", lambda b, p=p, m=m: norm_rows(b.acts[input_key(p)], m),
                       lambda f=features(m): ClassMoments(s.c, f, full=False),
                       own={"path": p, "type": type(m).__name__, "features": features(m)}, inputs=(p,))
                for p, m in s.norms]

    def write(self, rec, m, header):
        header.setdefault("norms", []).append(dict(rec.own))
        return super().write(rec, m, header)

    def contract(self, h):
        c = int(h["num_classes"])
        return {forms.key(self.name, st, n["path"]): shape for n in h.get("norms", [])
                for st, shape in forms.shapes("diag", c, int(n["features"])).items()}


def pooled_tokens(layers) -> list:
    """The token layers of ``layers`` (``LayerInfo``s or a header's ``layers[]`` rows) recorded per feature."""
    row = lambda i: (i["type"], i.get("stat", "unit")) if isinstance(i, dict) else (i.type, i.stat)  # noqa: E731
    return [i for i in layers if row(i) == ("token", "feature")]


def positions(layers: list[dict]) -> list[dict]:
    """The header's ``layers[]`` rows that hold a token-positions record (``positions: true``)."""
    return [row for row in layers if row.get("positions") is True]


class TokenPositions(Kind):
    """Per token layer recorded per feature that the header marks (``layers[].positions``), per class, the mean
    and std of every (token, feature) of its output: what pooling over tokens averages away, kept beside the
    pooled record at the cost of two ``T x D`` rows a class (no covariance). ``dfkd record`` adds it by default
    (``default_kinds``) for the pooled token layers that are not affine in the input (whose per-position means
    would give each class's mean input), and not under privacy (every record shares the budget); named in
    ``--kinds``, for every pooled token layer."""
    name = "token-positions"
    reveals = ("each class's mean and std of every pooled token layer's output at each token position; where "
               "such a layer is affine in the input, each class's mean training input in closed form")
    default = False

    def check(self, s):
        if not positions(s.layers):
            raise DfkdError("kinds", "token-positions needs a token layer recorded per feature (--token-stats "
                            "feature; under --first-layer unit the first layer is per unit), and the chosen layers "
                            f"of {type(s.model).__name__} have none")

    def records(self, s):
        return [Record(self.name, i.path, "diag", lambda b, p=i.path: b.acts[p].flatten(1),
                       lambda d=math.prod(i.shape): ClassMoments(s.c, d, full=False))
                for i, row in zip(s.infos, s.layers) if row.get("positions") is True]

    def form(self, layer):
        return "diag"

    def contract(self, h):
        c = int(h["num_classes"])
        return {forms.key(self.name, st, row["path"]): shape for row in positions(h["layers"])
                for st, shape in forms.shapes("diag", c, math.prod(row["shape"])).items()}


REGISTRY: dict[str, Kind] = {k.name: k for k in (TopLayer(), AllLayers(), SpectralAll(), SpectralPairs(),
                                                  ClassDiag(), NormStats(), TokenPositions())}
KINDS = tuple(k for k, kind in REGISTRY.items() if kind.default)


def default_kinds(model, example=None, infos=(), private: bool = False, norms=None) -> tuple[str, ...]:
    """The kinds ``dfkd record`` records when none are named: the paper's four, norm-stats for a teacher
    with LayerNorm or GroupNorm layers (given an ``example`` batch: layers its forward pass runs; ``norms``: those
    layers, where the caller found them already), and, not under privacy, token-positions where the chosen layers
    (``infos``) hold a token layer recorded per feature (``record`` keeps it for those not affine in the input)."""
    norms = norm_layers(model, example) if norms is None else norms
    return KINDS + (("norm-stats",) if norms else ()) + \
        (("token-positions",) if pooled_tokens(infos) and not private else ())


def means_kinds(kinds) -> list[str]:
    """The kinds of ``kinds`` (in registry order) that store each chosen layer's class means."""
    return [k for k, kind in REGISTRY.items() if kind.layer_means and k in kinds]


def means_kind(kinds) -> str | None:
    """The kind of ``kinds`` whose class means ``inversion`` solves (all-layers, else class-diag), or None;
    the closed-form notes name it (a header's ``closed_form`` entries do not)."""
    return next(iter(means_kinds(kinds)), None)


def entry_kind(kinds, entry: dict) -> str:
    """The kind whose class means a header's ``closed_form`` entry solves: token-positions for an entry per
    position, else ``means_kind`` (all-layers, else class-diag)."""
    return "token-positions" if entry.get("stat") == "position" else means_kind(kinds) or "all-layers"


def gives_means(kinds) -> bool:
    """Whether ``kinds`` hold a record of class means that ``inversion`` solves (the header says what follows)."""
    return bool(means_kinds(kinds)) or "token-positions" in kinds
