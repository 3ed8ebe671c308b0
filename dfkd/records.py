"""What every statistic kind is made of (``kinds`` holds the kinds themselves): the setup a kind's records are
made from, a batch as the records read it, a record (one stored Gaussian), a private release, and the
``Kind`` contract each registry entry keeps (``kinds``' docstring says what each part declares)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from . import forms
from .config import RecordConfig
from .graph import LayerInfo, layer_signal
from .privacy import ClippedMoments, Released

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Setup:
    """What a kind's records are made from: the model, its chosen layers (and their header rows), the
    command's settings and the class count."""
    model: nn.Module
    infos: list[LayerInfo]
    layers: list[dict]
    cfg: RecordConfig
    c: int
    norms: list = field(default_factory=list)  # the LayerNorm / GroupNorm layers a forward pass runs (normstats)


class Batch:
    """One batch as the records read it: the logits, the chosen layers' outputs, and each layer's node
    signal (computed on first use, once, and shared by every graph the layer belongs to)."""

    def __init__(self, logits: torch.Tensor, acts: dict[str, torch.Tensor], infos: list[LayerInfo]):
        self.logits, self.acts, self._infos, self._nodes = logits, acts, {i.path: i for i in infos}, {}

    def node(self, path: str) -> torch.Tensor:
        if path not in self._nodes:
            self._nodes[path] = layer_signal(self.acts[path], self._infos[path]).float().cpu()
        return self._nodes[path]


@dataclass
class Record:
    """One stored Gaussian and, under privacy, one clipped and noised release (named ``kind`` or
    ``kind/part``, as ``--clip`` and the privacy header spell it)."""
    kind: str
    part: str | None
    form: str                                    # the stored form (``forms``): full, diag or lowrank:K
    rows: Callable[[Batch], torch.Tensor]        # the record's rows of a batch
    exact: Callable[[], Any]                     # the exact pass's accumulator (``update(rows, labels)``)
    # the rows as the private pass clips, sums and releases them (the spectral kinds: their Fourier coefficients)
    released_rows: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    own: Any = None                              # the kind's own (a graph's layers, moments, eigenvalues)
    inputs: tuple[str, ...] = ()                 # module paths whose inputs its rows read (``Batch.acts``)

    @property
    def full(self) -> bool:
        """Whether the record accumulates a full covariance (its form full or low rank), else its diagonal."""
        return self.form != "diag"

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.part}" if self.part else self.kind


@dataclass
class Private:
    """A record's private release: the post-processed Gaussian, the noisy sums and counts it came from."""
    released: Released
    sums: ClippedMoments
    counts: torch.Tensor
    mean: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.mean = self.released.mean

    def covariance(self) -> torch.Tensor:
        return self.released.cov


class Kind:
    name: ClassVar[str]
    reveals: ClassVar[str]
    header_fields: ClassVar[tuple[str, ...]] = ()
    layer_means: ClassVar[bool] = False
    default: ClassVar[bool] = True  # recorded by ``dfkd record`` unless --kinds says otherwise

    def check(self, s: Setup) -> None:
        """Refuse settings this kind cannot record, before any kind prepares its records."""

    def records(self, s: Setup) -> list[Record]:
        raise NotImplementedError

    def contract(self, h: dict) -> Shapes:
        raise NotImplementedError

    def form(self, layer: dict) -> str:
        """The stored form of this kind's record of ``layer`` (a header's ``layers[]`` row): the layer kinds'."""
        raise NotImplementedError(f"kind {self.name} stores no record per layer")

    def graphs(self, h: dict) -> list[tuple[str | None, dict]]:
        """``(part, graph)`` for every graph of this kind the header declares (part None: the whole net): the
        spectral kinds'."""
        raise NotImplementedError(f"kind {self.name} stores no graph")

    def write(self, rec: Record, m, header: dict) -> dict[str, torch.Tensor]:
        """The record's tensors from its exact moments or its ``Private`` release."""
        return forms.write(self.name, rec.part, m, rec.form)

    def read(self, meta, part: str | None = None) -> dict[str, torch.Tensor]:
        """A part's stored tensors by statistic (a class Gaussian: ``mean`` and its form's)."""
        pre = forms.key(self.name, "", part)
        return {k[len(pre):]: v for k, v in meta.tensors.items() if k.startswith(pre) and "/" not in k[len(pre):]}
