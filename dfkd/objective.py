"""What every reconstruction objective is (``objectives`` holds them): it names the metadata kind it needs
(``kind``; spelled as in the file), the layers whose outputs (``layers``) or inputs (``inputs``) it reads,
draws its targets once per batch (``targets``), and gives the batch's total loss (``loss``): per-sample
terms are summed over the batch and batch-level terms weighted by the samples they cover, so batch size
does not change the dynamics."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .config import ReconstructConfig
from .graph import LayerInfo
from .kinds import REGISTRY
from .metadata import Metadata
from .models import device_of

Targets = dict[str, torch.Tensor]


class Objective:
    name: ClassVar[str]
    kind: ClassVar[str | None]  # the metadata kind it needs (None: the teacher alone)

    def __init__(self, meta: Metadata | None, model: nn.Module, cfg: ReconstructConfig):
        self.meta, self.model, self.cfg = meta, model, cfg
        self.dev = device_of(model)
        self.infos = [LayerInfo.from_dict(d) for d in meta.header["layers"]] if meta is not None else []

    def stored(self, part: str | None = None) -> dict[str, torch.Tensor]:
        """A part's tensors of the kind this objective needs, read through the kind (``kinds.REGISTRY``)."""
        return REGISTRY[self.kind].read(self.meta, part)

    def layers(self) -> list[str]:  # module paths whose outputs the loss reads: every recorded layer's
        return [i.path for i in self.infos]

    def inputs(self) -> list[str]:  # module paths whose inputs the loss reads
        return []

    def targets(self, labels: torch.Tensor, g: torch.Generator) -> Targets:
        return {}

    def loss(self, logits: torch.Tensor, acts: dict[str, torch.Tensor], tg: Targets,
             labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
