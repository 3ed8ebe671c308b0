"""What ``dfkd run`` makes: its pairs (``Pair``: a registry network's, or a user's own) with the recipes of
``recipes`` and the run's overrides, each student's stage configs, and the checks of a run's config."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

from .averaging import check_share
from .basis import BASES
from .config import DistillConfig, GeneratorConfig, ReconstructConfig, TrainConfig, default
from .data import FLOAT32_MAX
from .errors import DfkdError
from .kinds import KINDS
from .losses import temperature_problem
from .objectives import OBJECTIVES, known, needs
from .recipes import GENERATOR, OWN, PAIRS, PROFILES, SYNTHESES
from .run_config import RunConfig
from .specs import RANDOM_WEIGHTS, ModelRef, parse_args, require_weights
from .views import AUGMENT_FORM, AUGMENTS, SEEN, SEEN_FORM


@dataclass(frozen=True)
class Pair:
    """One teacher -> student pair of a run: a registry network and its registry student, or a user's own."""
    name: str               # its sub-folder of the run directory
    teacher: str            # the table's teacher; the spec the run builds and trains when given no trained teacher
    student: str            # a registry name or code (FILE.py:factory, module:factory)
    teacher_epochs: int
    student_epochs: int     # the real-data student's (and real-KD's) epochs
    student_lr: float       # and their learning rate
    recipe: dict            # ReconstructConfig fields but the objective and the seed
    distill: dict           # DistillConfig fields but the seed
    teacher_args: dict | None = None
    student_args: dict | None = None
    own: bool = False       # a user's: no paper figures, its objective from what the teacher offers
    generator: dict | None = None  # GeneratorConfig fields but the seed (--synthesis generator)
    without_bn: dict | None = None  # recipe entries that replace ``recipe``'s for all-layers without bn-stats
    unit_targets: str | None = None  # the run's --unit-targets: for every objective with an all-layers record
    sized: dict | None = None  # recipe entries per objective (its inputs and steps) chosen by --minutes (``budget.fit``)

    def recipe_for(self, objective: str) -> dict:
        """The reconstruction recipe of one objective: ``recipe``, with ``without_bn`` where it is all-layers
        without bn-stats (what a teacher without BatchNorm is given), and the run's ``unit_targets`` where an
        all-layers record is matched (the other objectives read no per-unit record, so their settings stay)."""
        parts = set(objective.split("+"))
        r = {**self.recipe, **((self.without_bn or {}) if "all-layers" in parts and "bn-stats" not in parts else {}),
             **(self.sized or {}).get(objective, {})}
        return r if not matches_records(objective) or self.unit_targets is None else dict(r, unit_targets=self.unit_targets)


def matches_records(objective: str) -> bool:
    """Whether an objective matches all-layers records (the ones ``unit_targets`` acts on)."""
    return bool(set(objective.split("+")) & {"all-layers", "all-layers-dropout"})


def trains_generator(objective: str) -> bool:
    """Whether an objective can train a generator: not noise (nothing to optimise) nor dropout (per-input masks)."""
    return not {"noise", "all-layers-dropout"} & set(objective.split("+"))


def generator_recipe(recipe: dict, cfg: RunConfig) -> dict:
    """A generator recipe with the run's ``iterations``."""
    return dict(recipe, **({"iterations": cfg.iterations} if cfg.iterations is not None else {}))


def _sized(r: dict, cfg: RunConfig) -> dict:
    """A recipe with the run's overrides (``images``, ``steps``, ``seen_views``, ``basis``, ``ce``)."""
    given = {"n": cfg.images, "steps": cfg.steps, "views": cfg.seen_views, "basis": cfg.basis, "ce": cfg.ce}
    return dict(r, **{k: v for k, v in given.items() if v is not None})


def _distill_given(cfg: RunConfig) -> dict:  # the run's overrides of a distillation recipe
    given = {k: getattr(cfg, k) for k in ("epochs", "lr", "temperature", "augment", "average") if getattr(cfg, k) is not None}
    return dict(given, lr=float(given["lr"])) if "lr" in given else given  # a numpy float saved as a JSON number


def given_teacher(cfg: RunConfig) -> ModelRef | None:
    """The trained teacher the run is given, or None: it trains one (a registry network, or the user's own
    teacher given as code without weights)."""
    if not cfg.teacher:
        return None
    m = ModelRef(cfg.teacher, cfg.weights, {}, cfg.code)
    if cfg.student is not None and m.is_spec and cfg.weights is None:
        return None
    require_weights(m)
    return m


OWN_FLAGS = ("weights", "teacher_args", "student_args", "stats", "normalize")  # for an own pair only


def _check_own(cfg: RunConfig) -> None:
    """Refuse what a run of the user's own pair cannot take (or would ignore), in one line each."""
    if not cfg.teacher:
        raise DfkdError("student", "your own student needs your teacher: give --teacher too")
    if cfg.profile not in OWN:
        raise DfkdError("profile", f"profile {cfg.profile} is for the paper's networks; your own pair runs under "
                        f"{' or '.join(OWN)}")
    if cfg.teachers or cfg.networks != default(RunConfig, "networks"):
        raise DfkdError("teachers" if cfg.teachers else "networks", "is for the paper's networks; your own pair is "
                        "--teacher and --student")
    spec = ModelRef(cfg.teacher).is_spec
    if cfg.weights == RANDOM_WEIGHTS:
        raise DfkdError("weights", "dfkd run distils a trained teacher: a freshly initialised one teaches nothing")
    if not spec and (cfg.weights or cfg.teacher_args):
        raise DfkdError("teacher_args" if cfg.teacher_args else "weights", f"{cfg.teacher} is a saved model: it "
                        "brings its own weights and arguments")
    if spec and not cfg.weights and cfg.stats:
        raise DfkdError("stats", "the run trains this teacher (no --weights) and records its statistics itself; "
                        "give --weights for a trained one")


def _check_temperature(cfg: RunConfig) -> None:
    """Refuse a --temperature that is not a number in (0, 1000] (``losses.temperature_problem``), or any but the
    paper's under its profile."""
    problem = temperature_problem(cfg.temperature)
    if problem:
        raise DfkdError("temperature", problem)
    if cfg.profile == "paper" and cfg.temperature != default(DistillConfig, "temperature"):
        raise DfkdError("temperature", "the paper profile distils at the paper's temperature, 8")


def _check_lr(cfg: RunConfig) -> None:
    """Refuse a --lr that is not a real number > 0 whose Adam first step (10 x lr) fits in float32, or any but the
    paper's 1e-3 under its profile."""
    lr = cfg.lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise DfkdError("lr", f"{lr!r} is not a finite number > 0")
    if not float(lr) * 10 < FLOAT32_MAX:  # Adam's first step is 10 x lr (its bias correction)
        raise DfkdError("lr", f"{float(lr):g} is too large: Adam's first step (10 x lr) does not fit in float32")
    if cfg.profile == "paper" and lr != PROFILES["paper"]["distill"]["lr"]:
        raise DfkdError("lr", "the paper profile distils at the paper's learning rate (Adam, 1e-3)")


def _check_teacher_epochs(cfg: RunConfig) -> None:
    """Refuse a --teacher-epochs that no teacher of the run would be trained for."""
    if cfg.teacher_epochs <= 0:
        raise DfkdError("teacher_epochs", "must be > 0")
    if cfg.profile == "paper":
        raise DfkdError("teacher_epochs", "the paper profile trains the paper's teachers as written (10 epochs)")
    why = ("--teachers uses an earlier run's teachers as they are (and trains those it lacks at the profile's count)"
           if cfg.teachers else f"{cfg.teacher} is given trained{' (code without --weights: trained here)' if cfg.student else ''}")
    if cfg.teachers or given_teacher(cfg) is not None:
        raise DfkdError("teacher_epochs", f"sets the epochs of a teacher the run trains; {why}")


def check(cfg: RunConfig) -> None:
    """Refuse, in one line each, a run config that cannot run."""
    if cfg.profile not in PROFILES:
        raise DfkdError("profile", f"unknown profile {cfg.profile!r}; choose one of {', '.join(PROFILES)}")
    if cfg.student is not None:
        _check_own(cfg)
    bad = [n for n in cfg.networks if n not in PAIRS]
    if cfg.student is None and (bad or not cfg.networks):
        raise DfkdError("networks", f"unknown network(s) {bad}; choose from {', '.join(PAIRS)}")
    bad = [o for o in cfg.objectives or () if not (known(o) if cfg.student else o in OBJECTIVES)]
    if bad:
        raise DfkdError("objectives", f"unknown objective(s) {bad}; choose from {', '.join(OBJECTIVES)}"
                        + (" (a metadata objective and bn-stats combine with +)" if cfg.student else ""))
    # dfkd run records the default kinds only (its statistics are shared by every objective of a network), and
    # for a user's pair norm-stats and token-positions where the teacher has what they record (``kinds.default_kinds``)
    extra = [(o, k) for o in cfg.objectives or () for k in needs(o)
             if k not in KINDS and not (k in ("norm-stats", "token-positions") and cfg.student is not None)]
    if extra and (cfg.student is None or given_teacher(cfg) is None):
        k = extra[0][1]
        raise DfkdError("objectives", f"{', '.join(dict.fromkeys(o for o, _ in extra))}: dfkd run records only the "
                        f"default kinds ({', '.join(KINDS)}); record {k} with dfkd record --kinds {k} and use dfkd "
                        "reconstruct")
    if (cfg.images is not None and cfg.images <= 0) or (cfg.steps is not None and cfg.steps < 0):
        raise DfkdError("images", "images must be > 0 and steps >= 0")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise DfkdError("epochs", "must be > 0")
    if cfg.temperature is not None:
        _check_temperature(cfg)
    if cfg.lr is not None:
        _check_lr(cfg)
    if cfg.synthesis not in SYNTHESES:
        raise DfkdError("synthesis", f"{cfg.synthesis!r} is not one of {', '.join(SYNTHESES)}")
    if cfg.average is not None:
        check_share(cfg.average)
        if cfg.profile == "paper" and cfg.average:
            raise DfkdError("average", "the paper profile keeps the last epoch's student, as the paper does")
    unused = ("iterations",) if cfg.synthesis == "optimise" else ("images", "steps", "epochs", "average")
    for f in (f for f in unused if getattr(cfg, f) is not None):
        raise DfkdError(f, "counts a generator's steps: give --synthesis generator too" if f == "iterations" else
                        f"{'averages' if f == 'average' else 'sizes'} "
                        f"{'a set of optimised inputs' if f in ('images', 'steps') else 'epochs on a synthetic set'}, "
                        "which --synthesis generator does not make (its budget: --iterations)")
    if cfg.synthesis == "generator" and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise DfkdError("synthesis", "a generator is trained in one process; run --synthesis generator without "
                        "torchrun")
    bad = [o for o in cfg.objectives or () if cfg.synthesis == "generator" and not trains_generator(o)]
    if bad:
        raise DfkdError("objectives", f"{', '.join(bad)} cannot train a generator (noise optimises nothing, dropout "
                        "masks are per optimised input); use another objective, or --synthesis optimise")
    if cfg.seen_views is not None and cfg.seen_views not in SEEN:
        raise DfkdError("seen_views", f"{cfg.seen_views!r} is not {SEEN_FORM}")
    if cfg.augment is not None and cfg.augment not in AUGMENTS:
        raise DfkdError("augment", f"{cfg.augment!r} is not {AUGMENT_FORM}")
    if cfg.profile == "paper" and cfg.augment not in (None, PROFILES["paper"]["distill"]["augment"]):
        raise DfkdError("augment", "the paper profile distils on the synthetic inputs as they are, as the paper does")
    if cfg.basis is not None and (cfg.basis not in BASES or cfg.synthesis == "generator"):
        raise DfkdError("basis", f"{cfg.basis!r} is not one of {', '.join(BASES)}" if cfg.basis not in BASES
                        else f"a generator makes its inputs itself; --basis {cfg.basis} is for --synthesis optimise")
    bad = cfg.ce is not None and ("must be finite and >= 0" if not (math.isfinite(cfg.ce) and cfg.ce >= 0) else
                                  "weights optimised inputs' cross-entropy: --synthesis optimise only"
                                  if cfg.synthesis == "generator" else "the paper profile optimises the paper's "
                                  "objective alone" if cfg.ce and cfg.profile == "paper" else None)
    if bad:
        raise DfkdError("ce", bad)
    if cfg.basis == "fourier" and cfg.profile == "paper":
        raise DfkdError("basis", "the paper profile optimises the pixels, as the paper does")
    if cfg.unit_targets not in (None, "draw", "batch"):
        raise DfkdError("unit_targets", f"{cfg.unit_targets!r} is not draw or batch")
    if cfg.profile == "paper" and (cfg.seen_views not in (None, "none") or cfg.unit_targets not in (None, "draw")):
        raise DfkdError("seen_views" if cfg.seen_views not in (None, "none") else "unit_targets", "the paper profile "
                        "runs the paper's method as written (the teacher sees the inputs as they are, each input "
                        "its own draw)")
    if cfg.teacher_epochs is not None:
        _check_teacher_epochs(cfg)
    if cfg.iterations is not None and cfg.iterations <= 0:
        raise DfkdError("iterations", "must be > 0")
    if cfg.seeds < 1:
        raise DfkdError("seeds", "must be >= 1")
    if cfg.student is None and cfg.teacher and (ModelRef(cfg.teacher).is_spec or len(cfg.networks) != 1):
        raise DfkdError("teacher", "a given teacher needs exactly one network (or your own student: --student)"
                        if len(cfg.networks) != 1 else f"for the paper's networks dfkd run takes a saved teacher; "
                        f"{cfg.teacher} builds a new network (your own teacher and student: --student)")
    if cfg.student is None and any(getattr(cfg, f) is not None for f in OWN_FLAGS):
        raise DfkdError("student", "--weights, --teacher-args, --student-args, --stats and --normalize are for "
                        "your own pair: give --teacher and --student")


def pairs(cfg: RunConfig) -> list[Pair]:
    """The run's pairs: with ``student``, the user's own (teacher ``teacher``); else one per registry network.
    A config that cannot run is refused in one line (``check``)."""
    check(cfg)
    p = PROFILES[cfg.profile]
    if cfg.student is None:
        return _averaging(cfg, [
            Pair(net, net, PAIRS[net], cfg.teacher_epochs or p["teacher_epochs"], p["baseline_epochs"][net], 1e-3,
                 _sized(dict(p["recipe"][net], batch_size=p["batch_size"]), cfg),
                 {**p["distill"], **p.get(f"{cfg.synthesis}_distill", {}).get(net, {}), **_distill_given(cfg)},
                 generator=generator_recipe(GENERATOR[cfg.profile], cfg),
                 unit_targets=cfg.unit_targets or p.get("unit_targets", {}).get(net)) for net in cfg.networks])
    o = OWN[cfg.profile]
    recipe = dict(o["recipe"], **o.get(f"{cfg.synthesis}_recipe", {}))
    distill = {**o["distill"], **o.get(f"{cfg.synthesis}_distill", {}), **_distill_given(cfg)}
    if cfg.colour != "auto" and not colour_views(cfg, _sized(recipe, cfg), distill):
        raise DfkdError("colour", "decides the profile's colour views, and this run has none left to decide (the "
                        "seen views and the distillation views are given, or a generator's teacher sees none): "
                        "give the views you want with --seen-views and --augment instead")
    return _averaging(cfg, [
        Pair("own", cfg.teacher, cfg.student, cfg.teacher_epochs or o["teacher_epochs"], cfg.epochs or o["distill"]["epochs"],
             float(cfg.lr or o["distill"]["lr"]), _sized(recipe, cfg), distill, parse_args(cfg.teacher_args, "teacher_args"),
             parse_args(cfg.student_args, "student_args"), own=True,
             generator=generator_recipe(o.get("generator", GENERATOR[cfg.profile]), cfg),
             without_bn=o.get("generator_without_bn") if cfg.synthesis == "generator" else None,
             unit_targets=cfg.unit_targets or o.get(f"{cfg.synthesis}_unit_targets"))])


def _averaging(cfg: RunConfig, made: list[Pair]) -> list[Pair]:
    """``made``, refused in one line where ``--average`` would average fewer than two of a pair's epochs."""
    for pair in made if cfg.average else ():
        check_share(cfg.average, pair.distill["epochs"])
    return made


def colour_views(cfg: RunConfig, recipe: dict, distill: dict) -> list[str]:
    """Which of an own pair's views hold the profile's recolouring (``+colour``) for ``--colour`` to decide: the
    ``seen views`` of its recipe unless ``--seen-views`` was given, the ``distillation views`` unless ``--augment``
    was (views the user gave are kept as given)."""
    return ["seen views"] * (cfg.seen_views is None and "+colour" in recipe.get("views", "none")) + \
        ["distillation views"] * (cfg.augment is None and "+colour" in distill.get("augment", ""))


def objectives(cfg: RunConfig, net: str) -> tuple[str, ...]:
    """A registry network's objectives: the run's, else the profile's, else every objective on the default kinds
    (which dfkd run records) and noise; not bn-stats (with ``--synthesis generator``, those that train one)."""
    if cfg.objectives is not None:
        return tuple(cfg.objectives)
    names = PROFILES[cfg.profile].get("objectives", {}).get(net, tuple(
        o for o, cls in OBJECTIVES.items() if o != "bn-stats" and cls.kind in (None, *KINDS)))
    return names if cfg.synthesis != "generator" else tuple(o for o in names if trains_generator(o))


def configs(name: str, pair: Pair, seed: int, cfg: RunConfig) -> tuple:
    """A student's stage configs: ``real-data``: its ``TrainConfig``; ``real-kd``: its ``DistillConfig`` (affine
    views labelled by the teacher, cosine lr); an objective: its reconstruction's and its distillation's."""
    if name == "real-data":
        return (TrainConfig(epochs=pair.student_epochs, lr=pair.student_lr, seed=seed),)
    if name == "real-kd":
        return (DistillConfig(epochs=pair.student_epochs, lr=pair.student_lr, augment="affine", schedule="cosine",
                              seed=seed),)
    rc = ReconstructConfig(**dict(pair.recipe_for(name), objective=name, seed=seed))
    dc = DistillConfig(**dict(pair.distill, seed=seed))
    return (rc, dc) if cfg.synthesis == "optimise" else (rc, dc, GeneratorConfig(**dict(pair.generator or {}, seed=seed)))
