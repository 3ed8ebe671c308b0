"""Frozen configuration per stage (what it makes) and how a stage runs (``Runtime``: device, progress, rank);
the whole run's is ``run_config.RunConfig``. The method configs are saved as JSON beside what each stage writes.
Each field carries its command-line spelling (``opt``): the command line makes
one flag per field (``cli_fields``), its type, default and help read from the field."""
from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any


def opt(default: Any, help: str, **cli: Any) -> Any:
    """A field with its flag: ``help``, and where needed ``flag`` (default ``--field-name``, for a bool
    that defaults to True ``--no-field-name``; ``None``: no flag, ``why`` says why), ``parse``
    (``positive``, ``clip``, ``range`` or ``temperature``; default: by the field's type), ``choices``, ``metavar``,
    ``repeat`` (the flag is given once per item) and ``later`` (added after work was saved: ``to_dict``
    leaves it out at its default). Help is argparse's: a literal ``%`` is ``%%``."""
    return field(default=default, metadata=dict(cli, help=help))


def flag(f: Field) -> str | None:
    """A field's flag: its own spelling, else ``--name`` (``--no-name`` for a bool that defaults to True)."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def flag_of(cls: type, name: str) -> str | None:
    return flag(next(f for f in fields(cls) if f.name == name))


SEED = "random seed"


def device_opt() -> Any:
    """The ``device`` field that ``Runtime`` and ``RunConfig`` share."""
    return opt("cpu", "cpu, cuda, cuda:N or auto (auto: the rank's own GPU under torchrun, else a GPU if any, else the CPU)")


def progress_opt() -> Any:
    """The ``progress`` field (``--quiet``) that ``Runtime`` and ``RunConfig`` share."""
    return opt(True, "no progress bars (shown on a terminal only) nor per-epoch or per-student lines", flag="--quiet")


@dataclass(frozen=True)
class Runtime:
    """How a stage runs, not what it makes: the device, progress bars, and the process's share of the work.
    train, record, reconstruct and distill (and their ``*_file`` forms) take one (``rt``) beside their method
    config; none of it is compared by a resume or saved in the settings of what a stage makes. The ``*_file`` forms
    move the model they load to ``device``, the object forms run where the model is; only reconstruct splits its
    work by ``rank`` / ``world_size`` (the others refuse them)."""
    device: str = device_opt()
    progress: bool = progress_opt()
    rank: int | None = opt(None, "this process's share of the shards, 0..W-1, with no process group (a job array; "
                           "default: torchrun's RANK, or all)")
    world_size: int | None = opt(None, "how many shares (default: torchrun's WORLD_SIZE, or 1)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = opt(10, "epochs (the paper's teachers: 10)", parse="positive")
    batch_size: int = opt(64, "examples per step", parse="positive")
    lr: float = opt(1e-3, "Adam's learning rate", parse="positive")
    schedule: str = opt("cosine", "cosine (anneal to 0; the last epoch is the stable one) or constant")
    augment: str = opt("none", "images only: each batch seen through random views, every view keeping its image's "
                       "label: shift (the whole batch moved by one offset of up to 2 pixels), affine (each image its own "
                       "rotation up to 15 degrees, scale 0.9 to 1.1 and shift up to 2 pixels; edges filled with the "
                       "data's black) or none, optionally +colour (an RGB image's channels reordered, each channel "
                       "scaled and offset)", later=True)
    seed: int = opt(0, SEED)


@dataclass(frozen=True)
class RecordConfig:
    kinds: tuple[str, ...] | None = opt(None, "comma-separated (default: the paper's four, top-layer, all-layers, "
                                        "spectral-all and spectral-pairs, with norm-stats, the LayerNorm/GroupNorm "
                                        "layers' inputs, for a teacher that has such layers, and token-positions, "
                                        "every token's mean and std, for token layers pooled per feature); also "
                                        "class-diag (per-layer class means and stds)")
    layers: tuple[str, ...] | None = opt(None, "comma-separated module paths, any module (default: every Linear/Conv2d, "
                                         "an nn.MultiheadAttention for its out_proj); PATH:maps: the attention "
                                         "weights of the nn.MultiheadAttention at PATH")
    cov: str = opt("auto", "all-layers covariance: auto, full, diag or lowrank:K")
    conv_stats: str = opt("channel", "conv maps' all-layers statistics per channel (pooled over positions) or per unit")
    first_layer: str = opt("pooled", "the first recorded layer's all-layers statistics: pooled like the others, or per "
                           "unit (a conv map's or a token sequence's every value; where the layer is affine in the "
                           "input with full column rank, as a patch embedding with at least as many features as a "
                           "patch has values, its class means give each class's mean input in closed form, which "
                           "reconstruction and the generator start from, and which the file then reveals)",
                           choices=("pooled", "unit"))
    token_stats: str = opt("feature", "token sequences' ([N, T, D]: a transformer's layers) all-layers statistics per "
                           "feature (pooled over tokens) or per unit (every token's own)", choices=("feature", "unit"))
    spectral_keep: float = opt(0.10, "fraction of Fourier coefficients kept", parse="positive")
    temperature: float = opt(8.0, "softmax temperature of the top-layer record", parse="temperature")
    batch_size: int = opt(1000, "inputs per forward pass", parse="positive")
    privacy: float | None = opt(None, "(epsilon, delta)-differential privacy for the whole file: clipped contributions, "
                                "Gaussian noise, calibrated by dp-accounting (the privacy extra)", metavar="EPSILON")
    delta: float | None = opt(None, "with --privacy (default: 1e-6, fixed whatever the data's size; needed above "
                              "100,000 training examples)")
    clip: tuple[tuple[str, float], ...] = opt((), "with --privacy: a record's clip bound (repeatable; e.g. top-layer=5, "
                                              "all-layers/fc1=60); the others are chosen privately on a share of the "
                                              "budget", parse="clip", repeat=True, metavar="RECORD=BOUND")
    clip_quantile: float = opt(0.95, "with --privacy: the share of examples a privately chosen bound leaves unclipped")
    value_range: tuple[float, float] | None = opt(
        None, "the inputs' raw value range, declared public (negative: --range=-1,1); needed with --privacy where it "
        "would be read off the data (a float npz)", flag="--range", parse="range", metavar="LOW,HIGH")


@dataclass(frozen=True)
class ReconstructConfig:
    objective: str = opt("spectral-pairs", "top-layer, all-layers, all-layers-dropout, spectral-all, spectral-pairs, "
                         "class-diag, token-positions, bn-stats, norm-stats or noise; combine with + (e.g. "
                         "all-layers+bn-stats)")
    n: int = opt(2000, "inputs to make (class-balanced)", flag="--images", parse="positive")
    batch_size: int = opt(500, "inputs optimised together (the paper: 64)", parse="positive")
    steps: int = opt(1000, "Adam steps per batch (the paper: 1000)")
    lr: float = opt(0.07, "Adam's learning rate on the inputs (the paper: 0.07)", parse="positive")
    init: str = opt("auto", "start: noise N(--init-mean, --init-std) (the paper's); class-mean: each class's mean "
                    "input, which the file reveals in closed form, + N(0, --init-std); auto: class-mean where revealed")
    init_mean: float = opt(0.15, "start: raw mean")
    init_std: float = opt(0.1, "start: raw std")
    clamp: bool = opt(True, "do not clamp inputs to the data's range")
    tv: float = opt(0.0, "weight of a total-variation prior (0: the paper's pure objective)")
    l2: float = opt(0.0, "weight of an l2 prior on the inputs (DeepInversion)")
    patch_tv: float = opt(0.0, "weight of a total-variation prior across the seams of a --patch grid only, on the "
                          "inputs as the teacher sees them (after --jitter and --seen-views), so on a ViT's patch "
                          "boundaries (0: none)", later=True)
    patch: int = opt(0, "the side of the patches whose seams --patch-tv smooths, from the top left corner (a ViT's "
                     "patch size; only with --patch-tv)", later=True)
    jitter: int = opt(0, "roll inputs by up to this many pixels each step (DeepInversion's jitter)")
    views: str = opt("none", "what the teacher sees of the inputs each step: none, or views drawn anew each step as "
                     "the student's are (affine: each input its own rotation, scale and shift; shift: one offset for "
                     "the batch; none+colour, affine+colour, shift+colour: each input's colours jittered too), so the "
                     "inputs made keep their class under those views; images only (other inputs are seen as they "
                     "are)", flag="--seen-views", later=True)
    unit_targets: str = opt("draw", "an all-layers record kept per unit: draw (each input matches its own draw from its "
                            "class Gaussian, the paper's) or batch (each class's inputs in the batch match its per-unit mean "
                            "and standard deviation, so that they vary as the data's do)", choices=("draw", "batch"),
                            flag="--unit-targets", later=True)
    basis: str = opt("pixel", "what Adam moves: pixel (the raw values, the paper's) or fourier (the Fourier "
                     "coefficients of each input's change from its start, each frequency f scaled by 1/f, through a "
                     "decorrelating colour matrix: coarse grey patterns move faster than fine coloured ones)",
                     choices=("pixel", "fourier"), later=True)
    bn_weight: float = opt(1.0, "weight of the bn-stats term")
    ce: float = opt(0.0, "weight of a cross-entropy term towards each input's intended class (DeepInversion's; per "
                    "input, as a generator's --ce; 0: none, the paper's)", later=True)
    whiten: bool = opt(True, "the paper's plain squared distance (by default each statistic's error is divided by "
                       "its std; all-layers and spectral objectives)")
    seed: int = opt(0, SEED)


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = opt(8.0, "Hinton KD temperature (the paper: 8)", parse="temperature")
    epochs: int = opt(30, "epochs (the paper: 30)", parse="positive")
    batch_size: int = opt(64, "examples per step", parse="positive")
    lr: float = opt(1e-3, "Adam's learning rate", parse="positive")
    augment: str = opt("affine+cutmix", "affine, shift or none, optionally +mix (mixup with the reversed batch) or "
                       "+cutmix (a box pasted from it), then optionally +colour (each image's channels reordered, scaled "
                       "and shifted at random), then optionally +backdrop (each image with chance 1/2 composited onto procedural "
                       "scenes made from no data); the teacher labels every view (needs --teacher)")
    schedule: str = opt("constant", "constant (the paper's plain Adam) or cosine")
    adversarial: float = opt(0.0, "share of each batch pushed towards student-teacher disagreement before the teacher "
                             "labels it (needs --teacher)")
    adversarial_steps: int = opt(2, "signed-gradient steps per pushed view")
    adversarial_step: float = opt(0.05, "size of each such step, in the data's raw units")
    eval_every: int = opt(1, "log test accuracy every N epochs (and after the last)", parse="positive")
    average: float = opt(0.0, "keep the mean of the student's weights after each of this last share of the epochs "
                         "(rounded half up, at least two; stochastic weight averaging, its BatchNorm statistics computed "
                         "again over the last epoch's first 8,192 views), not the last epoch's weights; 0: the last "
                         "epoch's", later=True)
    seed: int = opt(0, SEED)


@dataclass(frozen=True)
class GeneratorConfig:
    """``--synthesis generator``: a conditional generator trained against the frozen teacher, the student
    distilled online on its batches. The objective and the priors are the reconstruction's
    (``ReconstructConfig``: objective, init, tv, l2, patch_tv, jitter, bn_weight, whiten; ``init`` auto or class-mean
    anchors the generator on the class-mean inputs the statistics reveal), the student's steps the
    distillation's (``DistillConfig``: temperature, batch_size, lr, augment; its lr annealed by
    ``student_schedule``)."""
    iterations: int = opt(800, "generator steps, each followed by --student-steps student steps", parse="positive")
    batch_size: int = opt(128, "inputs the generator makes per step (even: two latents per intended label)",
                          parse="positive")
    latent: int = opt(64, "the generator's latent dimension", parse="positive")
    width: int = opt(32, "the generator's width (channels of its last hidden map)", parse="positive")
    lr: float = opt(1e-3, "the generator's Adam learning rate", parse="positive")
    student_steps: int = opt(5, "student steps per generator step, each on a batch drawn from the memory bank")
    student_schedule: str = opt("cosine", "the student's lr over the generator steps: cosine (anneal to 0) or constant")
    bank: int = opt(4096, "memory bank: the last N generated inputs, from which the student's batches are drawn",
                    parse="positive")
    ce: float = opt(1.0, "weight of the cross-entropy of the intended labels")
    disagreement: float = opt(1.0, "weight of the student-teacher disagreement the generator seeks")
    diversity: float = opt(0.5, "weight of the mode-seeking diversity term")
    eval_every: int = opt(100, "log test accuracy (and save the resume state) every N generator steps",
                          parse="positive")
    seed: int = opt(0, SEED)


@dataclass(frozen=True)
class ExportConfig:
    """``dfkd export``: the ONNX file (raw inputs in, logits out, any batch size) and, with ``quantize="int8"``,
    its post-training static quantization calibrated on a dfkd synthetic set (``quantization``)."""
    quantize: str = opt("none", "none (float32) or int8 (static: int8 weights, uint8 activations, calibrated on "
                        "--calibration)", choices=("none", "int8"))
    calibration_inputs: int = opt(1024, "calibration inputs: the first N of the synthetic set, read shard by shard",
                                  parse="positive")
    calibration_method: str = opt("minmax", "how activation ranges are set from them: minmax, entropy or percentile "
                                  "(ONNX Runtime's calibrators)", choices=("minmax", "entropy", "percentile"))
    per_channel: bool = opt(True, "one int8 scale per weight tensor instead of one per output channel")
    check_inputs: int = opt(1024, "synthetic inputs after the calibration ones on which int8 is checked against the "
                            "teacher's labels", parse="positive")
    max_drop: float = opt(1.0, "warn when int8 agrees with the teacher's labels on the checked inputs this many "
                          "points less than float32 does")
    opset: int = opt(20, "ONNX opset, 18 or newer (20: GELU as one node, for ONNX Runtime 1.17 and newer; 18 for "
                     "older runtimes)")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as JSON-ready settings; a field added after work was first saved (``later=True``) is left out
    at its default, so that a set, state or model saved before it existed still matches its settings."""
    later = {f.name: f.default for f in fields(cfg) if f.metadata.get("later")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
            if not (k in later and v == later[k])}


def default(cls: type, name: str) -> Any:
    """A config field's default (the command line shows and uses it)."""
    return next(f.default for f in fields(cls) if f.name == name)


def _stage_fields() -> list[Field]:
    """Every field of the stages' configs (what saved work's settings hold)."""
    return [f for c in (TrainConfig, RecordConfig, ReconstructConfig, DistillConfig, GeneratorConfig, ExportConfig) for f in fields(c)]


def later_defaults() -> dict[str, Any]:
    """The stages' settings added after work was saved (``later``), by name, with the default that work was made
    under: a message naming one that saved work lacks shows that default (``resume.differences``)."""
    return {f.name: f.default for f in _stage_fields() if f.metadata.get("later")}


def spelt_otherwise() -> dict[str, str]:
    """The stages' settings given a flag by name (``n``: ``--images``), for messages that name one (``resume``)."""
    return {f.name: f.metadata["flag"] for f in _stage_fields() if f.metadata.get("flag")}
