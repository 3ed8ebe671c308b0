"""Frozen configuration per stage and for the whole run (``RunConfig``), saved as JSON beside what
each stage writes. The command line's defaults are these fields' defaults (``default``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10               # the paper's teachers: 10 epochs
    batch_size: int = 64
    lr: float = 1e-3               # Adam
    schedule: str = "cosine"       # cosine (anneal to 0; the last epoch is the stable one) | constant
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class RecordConfig:
    kinds: tuple[str, ...] = ("top-layer", "all-layers", "spectral-all", "spectral-pairs")
    layers: tuple[str, ...] | None = None  # module paths; None = every Linear/Conv2d
    cov: str = "auto"                      # all-layers covariance: auto | full | diag | lowrank:K
    conv_stats: str = "channel"            # conv maps: per "channel" (pooled over positions) or per "unit"
    spectral_keep: float = 0.10            # fraction of graph-Fourier coefficients kept
    temperature: float = 8.0
    batch_size: int = 1000
    device: str = "cpu"
    progress: bool = True
    privacy: float | None = None           # epsilon of (epsilon, delta)-differential privacy; None: exact statistics
    delta: float | None = None             # None: 1e-6, fixed (needed above 100,000 training examples)
    clip: tuple[tuple[str, float], ...] = ()  # (record, bound) pairs; the others are chosen privately
    clip_quantile: float = 0.95            # the share of examples a privately chosen bound leaves unclipped
    value_range: tuple[float, float] | None = None  # the inputs' raw range, declared public (None: the source's)


@dataclass(frozen=True)
class ReconstructConfig:
    objective: str = "spectral-pairs"  # an objective, or several joined by "+" (e.g. all-layers+bn-stats)
    n: int = 2000                  # inputs to make, class-balanced
    batch_size: int = 500          # inputs optimised together (the paper: 64)
    steps: int = 1000              # Adam steps per batch (the paper: 1000)
    lr: float = 0.07               # Adam on the inputs (the paper: 0.07)
    init: str = "auto"             # noise: i.i.d. N(init_mean, init_std) raw (the paper); class-mean: the class's
    init_mean: float = 0.15        # mean input the file reveals + N(0, init_std); auto: class-mean where revealed
    init_std: float = 0.1
    clamp: bool = True             # keep inputs in the data's raw range after each step
    tv: float = 0.0                # weight of a total-variation image prior (0 = the paper's pure objective)
    l2: float = 0.0                # weight of an l2 prior on the inputs (DeepInversion)
    jitter: int = 0                # roll inputs by up to this many pixels each step (DeepInversion's jitter)
    bn_weight: float = 1.0         # weight of the bn-stats feature-distribution term
    whiten: bool = True            # standardise each statistic's error by its std (False: the paper's plain distance)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    rank: int | None = None        # this process's share of the shards (None: torchrun's RANK, or all of them)
    world_size: int | None = None  # how many shares (None: torchrun's WORLD_SIZE, or 1)


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 8.0       # Hinton KD temperature (the paper: 8)
    epochs: int = 30               # the paper: 30
    batch_size: int = 64
    lr: float = 1e-3               # Adam
    augment: str = "affine+cutmix" # affine | shift | none, +mix | +cutmix: augment the inputs, the teacher labels them
    schedule: str = "constant"     # constant (the paper's plain Adam) | cosine
    adversarial: float = 0.0       # share of each batch pushed towards student-teacher disagreement (0: none)
    adversarial_steps: int = 2     # signed-gradient steps per pushed view
    adversarial_step: float = 0.05  # step size in the data's raw units
    eval_every: int = 1            # log the real test accuracy every this many epochs (and after the last)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/quick"
    profile: str = "quick"
    networks: tuple[str, ...] = ("lenet5", "hinton-1200")
    objectives: tuple[str, ...] | None = None  # None: the profile's, else every objective but bn-stats (no BN here)
    teacher: str | None = None      # a saved teacher to use instead of training one (one network only)
    teachers: str | None = None     # an earlier run directory whose <network>/teacher* to use (or train there)
    images: int | None = None       # override the profile's synthetic images per objective
    steps: int | None = None        # override the profile's Adam steps per image
    epochs: int | None = None       # override the profile's distillation epochs
    baselines: bool = True          # also train the real-data and real-KD students
    seed: int = 0                   # the teacher's seed, and the first student seed
    seeds: int = 1                  # students per cell, seeds seed, seed + 1, ...: the table gives mean and spread
    data: str = "mnist"             # a data spec (mnist, idx:DIR, folder:DIR, npz:FILE)
    conv_stats: str = "unit"        # conv maps per unit: the paper's LeNet-5 statistics
    device: str = "cpu"
    progress: bool = True
    restart: bool = False           # redo work made with other settings (or damaged) instead of refusing


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def default(cls: type, name: str) -> Any:
    """A config field's default (the command line shows and uses it)."""
    return next(f.default for f in fields(cls) if f.name == name)
