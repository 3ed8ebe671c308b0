"""The configuration of a whole ``dfkd run`` (``RunConfig``): which networks or which pair of the user's own, the
profile and its overrides, the data, and how it runs. The stages' own configs are in ``config``; a run makes them
from this one (``profiles``)."""
from __future__ import annotations

from dataclasses import dataclass

from .config import device_opt, opt, progress_opt


@dataclass(frozen=True)
class RunConfig:
    out: str | None = opt(None, "run directory (default: runs/<profile>)")
    profile: str = opt("quick", "quick (every objective, the whole table in minutes on CPU), best (dfkd's best "
                       "student per network), paper (the paper's losses as written, at its sizes; GPU) or tiny")
    networks: tuple[str, ...] = opt(("lenet5", "hinton-1200"), "teachers: lenet5 and/or hinton-1200")
    objectives: tuple[str, ...] | None = opt(None, "comma-separated, of the default kinds' objectives and "
                                             "noise (default: the profile's, else all of them: no bn-stats, no "
                                             "BatchNorm here); for your own pair any objective or +-combination "
                                             "(default: from what its teacher offers)")
    teacher: str | None = opt(None, "a trained teacher instead of training one (one network only): a saved model, a "
                              "published folder, hf:ORG/NAME, or code (FILE.py:factory) with --weights; with --student, "
                              "your own teacher (code without --weights: trained here first)")
    weights: str | None = opt(None, "weights for a teacher given as code: .safetensors, or a state dict (read with "
                              "weights_only=True)")
    teacher_args: str | None = opt(None, "keyword arguments for the teacher's factory, as JSON")
    student: str | None = opt(None, "your own student (FILE.py:factory, module:factory or a registry name): with "
                              "--teacher, one pair of your own instead of --networks, its objective from what the "
                              "teacher offers (BatchNorm and statistics: all-layers+bn-stats; BatchNorm alone: "
                              "bn-stats; statistics alone: all-layers)")
    student_args: str | None = opt(None, "keyword arguments for the student's factory, as JSON")
    stats: str | None = opt(None, "your teacher's statistics file (default: the one beside --teacher, or --weights: "
                            "<stem>.stats.safetensors); dfkd run never records it for a teacher it is given")
    normalize: str | None = opt(None, "for a teacher given as code: the normalisation of its inputs, none, auto (the "
                                "training split's per-channel mean and std) or MEAN/STD (default: none)")
    code: tuple[str, ...] = opt((), "user code dfkd may import for a saved model made from it",
                                flag=None, why="--code, the flag every verb shares")
    teachers: str | None = opt(None, "an earlier run directory: use (or train once) <dir>/<network>/teacher and its "
                               "statistics")
    images: int | None = opt(None, "synthetic images per objective (default: the profile's)", parse="positive")
    steps: int | None = opt(None, "Adam steps per image (default: the profile's)")
    minutes: float | None = opt(None, "your own pair under optimise: choose the synthetic inputs (instead of --images) "
                                "so that each data-free student's reconstruction and distillation fit this many minutes "
                                "on this machine, its costs measured first (where the profile's inputs do not fit, at "
                                "fewer steps unless --steps is given); the sizes are kept in <out>/own/budget.json",
                                parse="positive", later=True)
    epochs: int | None = opt(None, "distillation epochs, and for your own pair its baselines' epochs too (default: the "
                             "profile's; your own pair under optimise: 100, annealed by a cosine, its baselines 30)", parse="positive")
    teacher_epochs: int | None = opt(None, "epochs of the teacher the run trains (a registry network's, or yours given "
                                     "as code without --weights; Adam lr 1e-3 annealed by a cosine); default: the "
                                     "profile's (quick: 10, your own pair 3)", parse="positive", later=True)
    lr: float | None = opt(None, "the students' Adam learning rate: the data-free students' and, for your own pair, its "
                           "baselines' too (the paper's networks' baselines keep 1e-3); default: the profile's (your "
                           "own pair 0.01, the paper's networks 1e-3; the paper profile refuses another)", parse="positive", later=True)
    temperature: float | None = opt(None, "the data-free students' KD temperature (default: the profile's, 8 as in the "
                                    "paper; also the disagreement views' steps; the real-KD baseline keeps 8, the paper profile refuses another)", parse="temperature", later=True)
    synthesis: str = opt("optimise", "optimise: a synthetic set, each input optimised for the objective, then the "
                         "student distilled on it; generator: a conditional generator trained against the teacher "
                         "with the same objective, the student distilled online on its batches",
                         choices=("optimise", "generator"))
    iterations: int | None = opt(None, "with --synthesis generator: generator steps (default: the profile's)",
                                 parse="positive")
    export: str = opt("none", "end with each data-free student as an ONNX file beside it: fp32, or int8 calibrated "
                      "on the inputs it was distilled from (its synthetic set, or a batch of its generator's); the "
                      "report gives the file's accuracy, size and latency", choices=("none", "fp32", "int8"))
    seen_views: str | None = opt(None, "what the teacher sees of the inputs being made (none, shift, affine, each optionally "
                                 "+colour); default: the profile's (your own pair under optimise: affine+colour; else none)", later=True)
    augment: str | None = opt(None, "the data-free students' distillation views (shift, affine or none, then optionally "
                              "+mix or +cutmix, +colour and +backdrop; views other than none and +mix need images); default: the "
                              "profile's (your own pair: affine+cutmix+colour; the paper's networks: affine+cutmix, "
                              "the paper profile none, which it alone takes); views given here are kept as given "
                              "(--colour decides the profile's)", later=True)
    average: float | None = opt(None, "the data-free students kept as their weights' mean after each of this last "
                                "share of the distillation's epochs (stochastic weight averaging, e.g. 0.5; --synthesis "
                                "optimise only, not the paper profile); default: 0, the last epoch's weights", later=True)
    ce: float | None = opt(None, "--synthesis optimise: weight of a cross-entropy term towards each input's intended "
                           "class (per input; DeepInversion's); default: the profile's (0: none)", later=True)
    basis: str | None = opt(None, "what reconstruction's Adam moves: pixel or fourier (each input's change from its "
                            "start in a 1/f-scaled Fourier basis with decorrelated colour); --synthesis optimise only; "
                            "default: the profile's (pixel)", choices=("pixel", "fourier"), later=True)
    colour: str = opt("auto", "your own pair's colour views (seen, distilled): keep, drop, or auto: dropped where inputs "
                      "made for a probe lose the teacher's label recoloured (colour is the class)", choices=("auto", "keep", "drop"), later=True)
    unit_targets: str | None = opt(None, "an all-layers record kept per unit: draw (each input its own draw, the paper's) "
                                   "or batch (each class's inputs match its per-unit mean and std); default: the profile's (batch: "
                                   "best's networks, your own pair under optimise, and a generator on your own pair's all-layers "
                                   "without bn-stats, what a teacher without BatchNorm is given; else draw)", choices=("draw", "batch"), later=True)
    baselines: bool = opt(True, "skip the real-data and real-KD students")
    seed: int = opt(0, "the teacher's seed, and the first student seed")
    seeds: int = opt(1, "students per cell (seeds --seed, --seed + 1, ...); the table gives their mean and spread",
                     parse="positive")
    data: str = opt("mnist", "a data spec: mnist, idx:DIR, folder:DIR, npz:FILE or cifar10:DIR")
    conv_stats: str = opt("unit", "conv maps' all-layers statistics per unit (the paper's) or per channel",
                          choices=("unit", "channel"))
    device: str = device_opt()
    progress: bool = progress_opt()
    restart: bool = opt(False, "where the output holds work made with other settings, or a damaged resume file, "
                        "shard, manifest or model, discard it and start that over instead of refusing (finished "
                        "work of the same settings is kept)")
