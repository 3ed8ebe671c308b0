"""The reconstruction objectives of Lopes, Fenu & Starner (2017), one small class each.

Every objective owns its metadata contract (``kind``: what ``dfkd record`` must have
stored), draws its targets once per batch (``targets``), and gives a per-sample loss
(``loss``); reconstruction sums it over the batch, so batch size does not change the
dynamics. ``z ~ N(0, I)`` below, drawn from the batch's own generator.

``whiten`` (all-layers and spectral objectives; the others ignore it) divides each
coordinate's error by its standard deviation pooled over classes,
``w_k = 1 / (sigma_k + 1e-3 mean(sigma))``: the
paper's plain squared distance is dominated by the few high-energy coordinates, whose
class means all samples share; standardised, every coordinate's spread counts, as in the
Gaussian's own likelihood, and the reconstructed images keep their diversity.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DfkdError
from .graph import LayerInfo, signal
from .metadata import Metadata

Targets = dict[str, torch.Tensor]


def _gauss(mean: torch.Tensor, labels: torch.Tensor, g: torch.Generator, *, chol=None, std=None,
           factor=None, resid=None) -> torch.Tensor:
    """Draw one target per label from the class's Gaussian (full, diagonal or low rank)."""
    m = mean[labels]
    z = torch.randn(m.shape, generator=g)
    if chol is not None:
        return m + torch.einsum("bij,bj->bi", chol[labels], z)
    if std is not None:
        return m + std[labels] * z
    zk = torch.randn((len(labels), factor.shape[-1]), generator=g)
    return m + torch.einsum("bij,bj->bi", factor[labels], zk) + resid[labels] * z


def whitening(std: torch.Tensor) -> torch.Tensor:
    """Per-coordinate weights ``[D]`` from per-class standard deviations ``[C, D]``."""
    s = std.mean(0)
    return 1.0 / (s + 1e-3 * s.mean())


class Objective:
    name: ClassVar[str]
    kind: ClassVar[str | None]  # the metadata kind it needs

    def __init__(self, meta: Metadata | None, model: nn.Module, whiten: bool = False):
        self.meta, self.model = meta, model  # ``whiten`` is read by the subclasses that use it
        self.t = meta.tensors if meta is not None else {}
        self.infos = [LayerInfo(l["path"], l["type"], tuple(l["shape"]), l["units"], l["nodes"])
                      for l in meta.header["layers"]] if meta is not None else []

    def layers(self) -> list[str]:
        """Module paths whose outputs the loss reads."""
        return []

    def targets(self, labels: torch.Tensor, g: torch.Generator) -> Targets:
        return {}

    def loss(self, logits: torch.Tensor, acts: dict[str, torch.Tensor], tg: Targets) -> torch.Tensor:
        raise NotImplementedError


class TopLayer(Objective):
    """``L = mean_k (ReLU(t_k) - ReLU(f(x)_k / T))^2`` with ``t = mu_c + L_c z`` from the
    per-class mean and Cholesky factor of the logits / T."""
    name, kind = "top-layer", "top_layer"

    def targets(self, labels, g):
        return {"top": _gauss(self.t["top_layer/mean"], labels, g, chol=self.t["top_layer/chol"])}

    def loss(self, logits, acts, tg):
        temp = float(self.meta.header["temperature"])
        return (F.relu(tg["top"]) - F.relu(logits / temp)).pow(2).mean(1)


class AllLayers(Objective):
    """``L = sum_l (1 / d_l) ||a_l(x) - t_l||^2`` over every recorded layer ``l`` of width
    ``d_l``, with ``t_l`` drawn per layer from its class Gaussian (full, diagonal or low rank)."""
    name, kind = "all-layers", "all_layers"

    def __init__(self, meta: Metadata, model: nn.Module, whiten: bool = False):
        super().__init__(meta, model, whiten)
        dev = next(model.parameters()).device
        self._w = {}
        for i in self.infos if whiten else []:
            pre = f"all_layers/{i.path}/"
            if pre + "std" in self.t:
                std = self.t[pre + "std"]
            elif pre + "chol" in self.t:
                std = self.t[pre + "chol"].pow(2).sum(-1).sqrt()
            else:
                std = (self.t[pre + "factor"].pow(2).sum(-1) + self.t[pre + "resid_std"].pow(2)).sqrt()
            self._w[i.path] = whitening(std).to(dev)

    def layers(self):
        return [i.path for i in self.infos]

    def targets(self, labels, g):
        out = {}
        for i in self.infos:
            pre = f"all_layers/{i.path}/"
            out[i.path] = _gauss(self.t[pre + "mean"], labels, g, chol=self.t.get(pre + "chol"),
                                 std=self.t.get(pre + "std"), factor=self.t.get(pre + "factor"),
                                 resid=self.t.get(pre + "resid_std"))
        return out

    def loss(self, logits, acts, tg):
        return sum(((acts[i.path].flatten(1) - tg[i.path]) * self._w.get(i.path, 1.0)).pow(2).mean(1)
                   for i in self.infos)


class AllLayersDropout(AllLayers):
    """The all-layers loss under fixed dropout filters: one random mask per batch, held for
    all its steps, keeping 80% of the inputs and 50% of every hidden layer's units
    (inverted dropout: kept values are divided by the keep rate). The loss reads the
    unmasked pre-activations; the masks change what later layers see."""
    name, kind = "all-layers-dropout", "all_layers"
    keep_input, keep_hidden = 0.8, 0.5

    def masks(self, input_shape, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        out = {"input": (torch.rand((n, *input_shape), generator=g) < self.keep_input).float() / self.keep_input}
        for i in self.infos[:-1]:
            out[i.path] = (torch.rand((n, *i.shape), generator=g) < self.keep_hidden).float() / self.keep_hidden
        return out


class _Spectral(Objective):
    """Shared by the spectral objectives: ``s_hat = V_K^T s(x)`` on each graph's kept basis."""
    graphs: ClassVar[str]

    def __init__(self, meta: Metadata, model: nn.Module, whiten: bool = False):
        super().__init__(meta, model, whiten)
        sp, by_path = meta.header["spectral"], {i.path: i for i in self.infos}
        gs = [("spectral_all", sp["all"])] if self.graphs == "all" else \
            [(f"spectral_pairs/{g['name']}", g) for g in sp["pairs"]]
        dev = next(model.parameters()).device
        # resolved once: the loss runs every step of every batch
        self._graphs = [(pre, [by_path[p] for p in g["layers"]], self.t[pre + "/basis"].to(dev),
                         whitening(self.t[pre + "/std"]).to(dev) if whiten else 1.0) for pre, g in gs]

    def prefixes(self) -> list[tuple[str, list[LayerInfo]]]:
        return [(pre, members) for pre, members, _, _ in self._graphs]

    def layers(self):
        return [i.path for i in self.infos]

    def targets(self, labels, g):
        return {pre: _gauss(self.t[pre + "/mean"], labels, g, std=self.t[pre + "/std"]) for pre, _ in self.prefixes()}

    def loss(self, logits, acts, tg):
        total = 0
        for pre, members, basis, w in self._graphs:
            coef = signal(acts, members) @ basis
            total = total + ((coef - tg[pre]) * w).pow(2).mean(1)
        return total


class SpectralAll(_Spectral):
    """``L = (1 / K) ||V_K^T s(x) - t||^2``: ``s(x)`` is the whole network's node signal, ``V_K``
    the kept eigenvectors of its weight-graph Laplacian, ``t = mu_c + sigma_c z`` per
    coefficient (stationary graph-signal model)."""
    name, kind, graphs = "spectral-all", "spectral_all", "all"


class SpectralPairs(_Spectral):
    """``L = sum_p (1 / K_p) ||V_p^T s_p(x) - t_p||^2`` over the graphs of adjacent layer pairs
    ``p``, each with its own (smaller, cheaper) Laplacian eigenbasis."""
    name, kind, graphs = "spectral-pairs", "spectral_pairs", "pairs"


class Noise(Objective):
    """The random-noise baseline: no optimisation, inputs stay at their N(mean, std) start."""
    name, kind = "noise", None


OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in
                                          (TopLayer, AllLayers, AllLayersDropout, SpectralAll, SpectralPairs, Noise)}


def make_objective(name: str, meta: Metadata | None, model: nn.Module, teacher_ref: str = "TEACHER",
                   whiten: bool = False) -> Objective:
    """Build an objective, checking that ``meta`` holds the statistics it needs."""
    if name not in OBJECTIVES:
        raise DfkdError("--objective", f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    if cls.kind is not None:
        if meta is None:
            raise DfkdError("--stats", f"objective {name} needs a statistics file")
        meta.require(cls.kind, teacher_ref)
    return cls(meta, model, whiten)
