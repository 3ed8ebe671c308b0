"""The reconstruction objectives, one small class each (the contract: ``objective.Objective``): Lopes, Fenu &
Starner (2017) from metadata, DeepInversion's BatchNorm matching (Yin et al. 2020) from the teacher alone,
its recorded analogue for LayerNorm / GroupNorm (``norm-stats``; both in ``normobjectives``), and noise. ``z ~ N(0, I)`` below, drawn
from the batch's own generator. Objectives combine with ``+`` (``all-layers+bn-stats``): their losses add.

``whiten`` (all-layers and spectral objectives) divides each coordinate's error by its
standard deviation pooled over classes, ``w_k = 1 / (sigma_k + 1e-3 mean(sigma))``: the
paper's plain squared distance is dominated by the few high-energy coordinates whose class
means all samples share; standardised, every coordinate's spread counts, as in the
Gaussian's own likelihood, and the reconstructed inputs keep their diversity.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import forms
from .config import ReconstructConfig
from .errors import DfkdError
from .graph import LayerInfo, layer_rows, signal
from .kinds import REGISTRY
from .metadata import Metadata
from .moments import sq_distance
from .objective import Objective
from .taps import maps_paths
from .normobjectives import BNStats, NormStats
from .stats import class_match, unit_match, whitening

class TopLayer(Objective):
    """``L = mean_k (ReLU(t_k) - ReLU(f(x)_k / T))^2`` with ``t = mu_c + L_c z`` from the
    per-class mean and Cholesky factor of the logits / T."""
    name, kind = "top-layer", "top-layer"

    def layers(self):  # the logits alone
        return []

    def targets(self, labels, g):
        return {"top": forms.draw(self.stored(), labels, g)}

    def loss(self, logits, acts, tg, labels):
        temp = float(self.meta.header["temperature"])
        return (F.relu(tg["top"]) - F.relu(logits / temp)).pow(2).mean(1).sum()


class AllLayers(Objective):
    """Per recorded layer ``l`` of dimension ``d_l``: a per-unit layer adds
    ``(1 / d_l) ||w (a_l(x) - t_l)||^2`` per sample, ``t_l`` drawn from its class Gaussian (with
    ``unit_targets`` batch instead, per class present, the batch's mean and per-unit standard deviation against
    the stored ones: ``stats.unit_match``); a
    pooled layer (a conv map per channel, a token sequence per feature) matches, per class present in the batch, the
    pooled channel mean and covariance (variance when diagonal) of the batch's samples of that
    class against the stored ones, ``(1/d) ||w (m - mu)||^2 + (1/d^2) ||w w^T . (S - Sigma)||^2``,
    weighted by the class's samples (DeepInversion's batch-level matching, per class)."""
    name, kind = "all-layers", "all-layers"

    def __init__(self, meta, model, cfg):
        super().__init__(meta, model, cfg)
        if cfg.unit_targets not in ("draw", "batch"):
            raise DfkdError("unit_targets", f"{cfg.unit_targets!r} is not draw or batch")
        self._g, self._w, self._cov = {}, {}, {}
        self._draw = {i.path: self.stored(i.path) for i in self.infos
                      if i.stat == "unit" and cfg.unit_targets == "draw"}
        for i in self.infos:
            gauss = {k: v.to(self.dev) for k, v in self.stored(i.path).items()}
            self._g[i.path] = gauss
            self._w[i.path] = whitening(forms.std(gauss)) if cfg.whiten else torch.ones(i.dim, device=self.dev)
            if i.pooled:
                self._cov[i.path] = forms.cov(gauss)
            elif i.path not in self._draw:  # matched by the batch: the per-unit standard deviations
                self._cov[i.path] = forms.std(gauss)

    def targets(self, labels, g):
        return {path: forms.draw(gauss, labels, g) for path, gauss in self._draw.items()}

    def loss(self, logits, acts, tg, labels):
        total = logits.new_zeros(())
        for i in self.infos:
            if i.pooled:
                total = total + class_match(layer_rows(acts[i.path], i), labels, self._g[i.path]["mean"],
                                            self._cov[i.path], self._w[i.path])
            elif i.path not in self._draw:
                total = total + unit_match(acts[i.path].flatten(1), labels, self._g[i.path]["mean"], self._cov[i.path],
                                           self._w[i.path])
            else:
                total = total + sq_distance(acts[i.path].flatten(1), tg[i.path], self._w[i.path])
        return total


class AllLayersDropout(AllLayers):
    """The all-layers loss under fixed dropout filters: one random mask per batch, held for
    all its steps, keeping 80% of the inputs and 50% of every hidden layer's units
    (inverted dropout: kept values are divided by the keep rate). The loss reads the
    unmasked pre-activations; the masks change what later layers see."""
    name, kind = "all-layers-dropout", "all-layers"
    keep_input, keep_hidden = 0.8, 0.5

    def masks(self, input_shape, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        out = {"input": (torch.rand((n, *input_shape), generator=g) < self.keep_input).float() / self.keep_input}
        maps = maps_paths(self.model, [i.path for i in self.infos])  # read, never passed on: nothing to mask
        for i in self.infos[:-1]:
            if i.path in maps:
                continue
            out[i.path] = (torch.rand((n, *i.shape), generator=g) < self.keep_hidden).float() / self.keep_hidden
        return out


class _Spectral(Objective):
    """Shared by the spectral objectives: ``s_hat = V_K^T s(x)`` on each graph's kept basis."""
    kind: ClassVar[str]

    def __init__(self, meta, model, cfg):
        super().__init__(meta, model, cfg)
        by_path = {i.path: i for i in self.infos}
        # resolved once: the loss runs every step of every batch
        self._graphs = []
        for part, g in REGISTRY[self.kind].graphs(meta.header):
            t = self.stored(part)
            gauss = {"mean": t["mean"], "std": t["std"]}
            self._graphs.append((f"{self.kind}/{part}", [by_path[p] for p in g["layers"]], t["basis"].to(self.dev),
                                 gauss, whitening(gauss["std"]).to(self.dev) if cfg.whiten else 1.0))

    def targets(self, labels, g):
        return {name: forms.draw(gauss, labels, g) for name, _, _, gauss, _ in self._graphs}

    def loss(self, logits, acts, tg, labels):
        total = logits.new_zeros(())
        for name, members, basis, _, w in self._graphs:
            coef = signal(acts, members) @ basis
            total = total + ((coef - tg[name]) * w).pow(2).mean(1).sum()
        return total


class SpectralAll(_Spectral):
    """``L = (1 / K) ||V_K^T s(x) - t||^2``: ``s(x)`` is the whole network's node signal, ``V_K``
    the kept eigenvectors of its weight-graph Laplacian, ``t = mu_c + sigma_c z`` per
    coefficient (stationary graph-signal model)."""
    name, kind = "spectral-all", "spectral-all"


class SpectralPairs(_Spectral):
    """``L = sum_p (1 / K_p) ||V_p^T s_p(x) - t_p||^2`` over the graphs of adjacent layer pairs
    ``p``, each with its own (smaller, cheaper) Laplacian eigenbasis."""
    name, kind = "spectral-pairs", "spectral-pairs"


class ClassDiag(Objective):
    """Per recorded layer of dimension ``d`` (a conv map per channel pools its positions), per class present
    in the batch: the batch's class mean ``m`` and variance ``s`` of each coordinate against the stored mean
    and std, ``(1/d) ||w (m - mu)||^2 + (1/d) ||w^2 (s - sigma^2)||^2``, weighted by the class's samples
    (the all-layers channel match with a diagonal covariance, on every layer; needs ``class-diag``)."""
    name, kind = "class-diag", "class-diag"

    def __init__(self, meta, model, cfg):
        super().__init__(meta, model, cfg)
        self.infos = self.chosen(self.infos)
        self._g = {i.path: {k: v.to(self.dev) for k, v in self.stored(i.path).items()} for i in self.infos}
        self._w = {i.path: whitening(g["std"]) if cfg.whiten else torch.ones(g["std"].shape[1], device=self.dev)
                   for i, g in zip(self.infos, self._g.values())}

    def chosen(self, infos: list[LayerInfo]) -> list[LayerInfo]:
        """The recorded layers the kind stores a record of: every one."""
        return infos

    def rows(self, out: torch.Tensor, i: LayerInfo) -> torch.Tensor:
        """A layer's output as the record's rows ``[N, d, P]`` (a pooled layer's positions as draws)."""
        return layer_rows(out, i) if i.pooled else out.flatten(1).unsqueeze(2)

    def loss(self, logits, acts, tg, labels):
        total = logits.new_zeros(())
        for i in self.infos:
            g = self._g[i.path]
            total = total + class_match(self.rows(acts[i.path], i), labels, g["mean"], g["std"].pow(2), self._w[i.path])
        return total


class TokenPositions(ClassDiag):
    """``class-diag``'s match on each token layer recorded per feature, at every (token, feature): per class
    present in the batch, the batch's mean and variance of each of its ``T x D`` values against the stored
    ones (needs ``token-positions``; combines with the pooled record's ``all-layers``)."""
    name, kind = "token-positions", "token-positions"

    def chosen(self, infos):  # the layers the header marks (``layers[].positions``), in the header's order
        return [i for i, row in zip(infos, self.meta.header["layers"]) if row.get("positions") is True]

    def rows(self, out, i):
        return out.flatten(1).unsqueeze(2)


class Noise(Objective):
    """The random-noise baseline: no optimisation, inputs stay at their N(mean, std) start."""
    name, kind = "noise", None


class Combined(Objective):
    """Several objectives at once (``a+b``): their losses add."""
    kind = None

    def __init__(self, parts: list[Objective]):
        self.parts, self.name = parts, "+".join(p.name for p in parts)
        self.kind = next((p.kind for p in parts if p.kind), None)
        self.masks = next((p.masks for p in parts if hasattr(p, "masks")), None)
        if self.masks is None:
            del self.masks

    def layers(self):
        return list(dict.fromkeys(p for o in self.parts for p in o.layers()))

    def inputs(self):
        return list(dict.fromkeys(p for o in self.parts for p in o.inputs()))

    def targets(self, labels, g):
        return {f"{k}|{name}": v for k, o in enumerate(self.parts) for name, v in o.targets(labels, g).items()}

    def loss(self, logits, acts, tg, labels):
        return sum(o.loss(logits, acts, {n.partition("|")[2]: v for n, v in tg.items() if n.startswith(f"{k}|")},
                          labels) for k, o in enumerate(self.parts))


OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (TopLayer, AllLayers, AllLayersDropout, SpectralAll,
                                                               SpectralPairs, ClassDiag, TokenPositions, BNStats,
                                                               NormStats, Noise)}


def known(name: str) -> bool:
    """Whether ``name`` is an objective or a ``+``-joined combination of them (noise joins none)."""
    names = name.split("+")
    return all(n in OBJECTIVES for n in names) and not ("noise" in names and len(names) > 1)


def needs(name: str) -> list[str]:
    """The metadata kinds a known objective (or combination) needs: none for bn-stats and noise."""
    return [OBJECTIVES[n].kind for n in name.split("+") if OBJECTIVES[n].kind]


def make_objective(name: str, meta: Metadata | None, model: nn.Module, cfg: ReconstructConfig = ReconstructConfig(),
                   teacher_ref: str = "TEACHER") -> Objective:
    """Build an objective (or a ``+``-joined combination), checking that ``meta`` holds what it needs."""
    if not known(name):
        raise DfkdError("objective", f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)} "
                        "(metadata and bn-stats objectives combine with +)")
    parts = []
    for n in name.split("+"):
        cls = OBJECTIVES[n]
        if cls.kind is not None:
            if meta is None:
                raise DfkdError("stats", f"objective {n} needs a statistics file")
            meta.require(cls.kind, teacher_ref)
        parts.append(cls(meta, model, cfg))
    return parts[0] if len(parts) == 1 else Combined(parts)
