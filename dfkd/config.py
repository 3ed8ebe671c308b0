"""Frozen configuration per stage, saved as JSON beside what each stage writes."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    model: str = "lenet5"          # registry name of the network to train
    out: str = "runs/mnist"        # run directory; writes <name>.safetensors + <name>.json there
    name: str = "teacher"          # file stem
    epochs: int = 10               # the paper's teachers: 10 epochs
    batch_size: int = 64
    lr: float = 1e-3               # Adam
    seed: int = 0
    data_dir: str | None = None    # IDX directory; None = the packaged MNIST
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class RecordConfig:
    teacher: str = "runs/mnist/teacher"   # saved model (stem or file)
    out: str | None = None                # default: <teacher>.stats.safetensors
    kinds: tuple[str, ...] = ("top_layer", "all_layers", "spectral_all", "spectral_pairs")
    layers: tuple[str, ...] | None = None  # module paths; None = every Linear/Conv2d
    cov: str = "auto"                      # all-layers covariance: auto | full | diag | lowrank:K
    spectral_keep: float = 0.10            # fraction of graph-Fourier coefficients kept
    temperature: float = 8.0
    batch_size: int = 1000
    data_dir: str | None = None
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class ReconstructConfig:
    objective: str = "spectral_pairs"
    n: int = 2000                  # images to make, class-balanced
    batch_size: int = 500          # images optimised together (the paper: 64)
    steps: int = 1000              # Adam steps per batch (the paper: 1000)
    lr: float = 0.07               # Adam on the inputs (the paper: 0.07)
    init_mean: float = 0.15        # inputs start i.i.d. N(init_mean, init_std) (the paper's values)
    init_std: float = 0.1
    clamp: bool = True             # keep inputs in the data's range [0, 1] after each step
    tv: float = 0.0                # weight of a total-variation image prior (0 = the paper's pure objective)
    jitter: int = 0                # roll inputs by up to this many pixels each step (DeepInversion's jitter)
    whiten: bool = True            # standardise each statistic's error by its std (False: the paper's plain distance)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class DistillConfig:
    student: str = "lenet5-half"   # registry name
    temperature: float = 8.0       # Hinton KD temperature (the paper: 8)
    epochs: int = 30               # the paper: 30
    batch_size: int = 64
    lr: float = 1e-3               # Adam
    augment: str = "affine"        # affine | shift | shift+mix | none: augment the inputs, the teacher labels them
    schedule: str = "constant"     # constant (the paper's plain Adam) | cosine
    eval_every: int = 1            # log the real test accuracy every this many epochs (and after the last)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
