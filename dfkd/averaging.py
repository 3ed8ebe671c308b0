"""The student's weights averaged over the last epochs (stochastic weight averaging: Izmailov, Podoprikhin,
Garipov, Vetrov & Wilson 2018), the model a distillation keeps where ``--average`` asks for it.

After each of the run's last ``epochs_averaged(share, epochs)`` epochs (the share of the epochs rounded half
up; at least two) the weights join an equal-weight running mean (``torch.optim.swa_utils.AveragedModel``); an
average's BatchNorm statistics are those of no model that ran, so before it is measured or kept they are
computed again (``swa_utils.update_bn``) over the epoch's views as prepared for its steps (before any share is
pushed towards disagreement), in its batches: its first chunk (up to ``loop.CHUNK`` inputs; a DataLoader's first
batch; under torchrun the rank's own rows, so each rank's statistics are its own, and rank 0's are saved). It is
done after each epoch the average is measured (every ``eval_every``) and after the last: a pass over the chunk.
The average, its count included, travels in the resume state, so a resumed run keeps the same mean.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from .data import DataInfo, at_input
from .errors import DfkdError

PREFIX = "average/"  # its tensors' keys in the resume state


def epochs_averaged(share: float, epochs: int) -> int:
    """How many of the last ``epochs`` a ``share`` averages: ``share * epochs`` rounded half up."""
    return math.floor(round(share * epochs, 9) + 0.5)  # 0.7 x 45 is 31.499999... in floats: 32


def check_share(share: float, epochs: int | None = None) -> None:
    """Refuse a share of the epochs that is not a number in [0, 1), or (given the run's ``epochs``) one that
    averages fewer than two of them (0 keeps the last epoch's weights)."""
    if not (math.isfinite(share) and 0 <= share < 1):
        raise DfkdError("average", f"the share of the epochs to average must be in [0, 1) (0: the last epoch's "
                        f"weights), not {share}")
    if share and epochs is not None and epochs_averaged(share, epochs) < 2:
        raise DfkdError("average", f"{share} of {epochs} epochs averages {epochs_averaged(share, epochs)}: give a "
                        "share that covers at least two epochs, or 0 for the last epoch's weights")


class Average:
    """The running mean of ``model``'s weights after each epoch from ``first`` (0-based) of ``epochs``."""

    def __init__(self, model: nn.Module, share: float, epochs: int):
        check_share(share, epochs)
        self.first = epochs - epochs_averaged(share, epochs)
        self.mean = AveragedModel(model)  # a copy on the model's device; its buffers are refreshed, not averaged

    def active(self, epoch: int) -> bool:
        """Whether the weights after (0-based) ``epoch`` belong to the average."""
        return epoch >= self.first

    @property
    def count(self) -> int:
        return int(self.mean.n_averaged)

    def update(self, model: nn.Module) -> None:
        self.mean.update_parameters(model)

    def refresh(self, views: torch.Tensor, sizes: list[int], info: DataInfo | None, device: torch.device) -> nn.Module:
        """The average with its BatchNorm statistics computed over ``views`` (raw inputs) in batches of ``sizes``
        (as the steps took them); returns the averaged network itself (not behind the normalisation)."""
        update_bn((v.to(device) for v in views.split(sizes)), at_input(self.mean.module, info))
        self.mean.module.eval()
        return self.mean.module

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.mean.state_dict().items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """The mean from a resume state's tensors (``KeyError``/``RuntimeError`` where they do not fit)."""
        self.mean.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}, strict=True)
