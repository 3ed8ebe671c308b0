"""Whether a teacher's label rides on colour, found without data (``dfkd run --colour``).

A user's own pair is made under colour views: the teacher sees the inputs being made recoloured (their channels
reordered, scaled and offset) and the student is distilled on recoloured views. That pays where colour says nothing
of the class (colour digits: the student learns shapes, not the made inputs' accidental colours), and it breaks
where colour is the class (which photograph a patch comes from: grass is green, the moon grey): an input cannot
keep its class under a view that takes away what tells it, and a student distilled on recoloured views learns what
its test images never show. So before the first data-free student is made, ``auto`` makes a few inputs for the
teacher (the run's first objective that is not noise, its priors, its views without colour), recolours each of them
as the views would, and keeps the colour views only where the teacher's label survives well above chance
(``decide``). The decision is written beside the probe's inputs (one per probe settings and teacher) and read back
by every rank and every resume; ``--restart`` measures it again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from .config import ReconstructConfig, Runtime
from .data import DataInfo, at_input
from .distributed import Ranks
from .errors import DfkdError, OtherSettings
from .files import read_json, write_json
from .metadata import Metadata
from .profiles import Pair, colour_views
from .recipes import OWN
from .reconstruction import reconstruct
from .resume import config_settings
from .run_config import RunConfig
from .synthetic import SyntheticSet
from .views import recolour

CHOICES = next(f for f in fields(RunConfig) if f.name == "colour").metadata["choices"]
DRAWS = 8  # recolourings of each probe input


def without_colour(how: str) -> str:
    """Views (a ``--seen-views`` or a distillation's ``--augment``) without their recolouring."""
    return how.replace("+colour", "")


def bar(classes: int) -> float:
    """The share of recoloured inputs that must keep their class for the colour views to stay: a sixth of the way
    from chance (``1 / classes``) to all of them (0.25 for ten classes)."""
    return 1 / classes + (1 - 1 / classes) / 6


def survival(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DataInfo, draws: int = DRAWS,
             seed: int = 0) -> tuple[float, int] | None:
    """Of the raw inputs ``x`` the teacher gives their intended class ``y``, the share that keep it when recoloured
    (the mean over ``draws`` recolourings), and how many there were; None where there were none."""
    f, g = at_input(teacher.eval(), info), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hit = f(x).argmax(1) == y
        if not bool(hit.any()):
            return None
        x, y = x[hit], y[hit]
        kept = [(f(recolour(x, g, info.low, info.high)).argmax(1) == y).double().mean() for _ in range(draws)]
    return float(torch.stack(kept).mean()), int(hit.sum())


def probe(teacher: nn.Module, meta: Metadata | None, info: DataInfo, rc: ReconstructConfig, out: Path,
          restart: bool = False, device: str = "cpu") -> dict:
    """Make ``rc``'s few inputs under ``out`` (a synthetic set, resumed like any; in this process alone) and measure
    their survival under recolouring: what ``decide`` reads and the report states."""
    reconstruct(teacher, meta, out, rc, info, restart, Runtime(device=device, progress=False, rank=0, world_size=1))
    t0, synth = time.perf_counter(), SyntheticSet(out).open()
    x, y, _ = synth.load()
    dev = next(iter(teacher.parameters()), torch.empty(0)).device
    s = survival(teacher, x.to(dev), y.to(dev), info, seed=rc.seed)
    made = sum(s["seconds"] for s in synth.manifest["shards"])  # a resumed probe's whole
    return {"inputs": len(x), "intended": 0 if s is None else s[1], "survival": None if s is None else s[0],
            "bar": bar(info.num_classes), "seconds": made + time.perf_counter() - t0}


def check_colour(cfg: RunConfig) -> None:
    """Refuse a ``--colour`` that is not a choice, or one that a registry pair (whose recipe has no colour views;
    theirs come from --seen-views) would ignore."""
    if cfg.colour not in CHOICES:
        raise DfkdError("colour", f"{cfg.colour!r} is not one of {', '.join(CHOICES)}")
    if cfg.colour != "auto" and cfg.student is None:
        raise DfkdError("colour", "decides the colour views of your own pair's recipe (--student); the paper's "
                        "networks have none but those --seen-views gives")


def decide(cfg: RunConfig, pair: Pair, teacher: nn.Module, meta: Metadata | None, info: DataInfo, d: Path,
           ranks: Ranks = Ranks(), device: str = "cpu", teacher_sha: str | None = None) -> tuple[Pair, dict | None]:
    """An own pair with its colour views kept or dropped (``cfg.colour``), and what decided it: ``views`` kept or
    dropped, ``of`` which (the recipe's seen views unless ``--seen-views`` was given, the distillation's unless
    ``--augment`` was: views the user gave are kept as given), ``by`` the choice, and for ``auto`` the probe's
    counts; None where the pair has no colour views to decide on (not images, none in its recipe, or all of them
    given by the user). ``auto`` keeps them where there is nothing to probe with (noise only) or the teacher gives
    too few probe inputs their class to tell."""
    seen, of = pair.recipe.get("views", "none"), colour_views(cfg, pair.recipe, pair.distill)
    ours, distilled = "seen views" in of, "distillation views" in of
    if len(info.shape) != 3 or not of:
        return pair, None
    how = {"by": cfg.colour, "of": of}
    names = [o for o in cfg.objectives or () if "noise" not in o.split("+")]
    p = OWN[cfg.profile]["colour_probe"]
    if cfg.colour == "auto" and names:
        n = max(p["least"], min(p["per_class"] * info.num_classes, p["most"]))
        rc = ReconstructConfig(**dict(pair.recipe_for(names[0]), objective=names[0], views=without_colour(seen), n=n,
                                      batch_size=n, steps=p["steps"], seed=cfg.seed))
        key = json.dumps([config_settings(rc), meta.header.get("tensors_sha256") if meta else None, teacher_sha,
                          info.mean, info.std], sort_keys=True)
        out = d / "synthetic" / f"colour-probe-{hashlib.sha256(key.encode()).hexdigest()[:12]}"  # one per settings
        found = out.with_suffix(".json")
        if ranks.main and (cfg.restart or not found.is_file()):
            write_json(found, dict(probe(teacher, meta, info, rc, out, cfg.restart, device), objective=names[0]))
        ranks.barrier()
        how.update(read_json(found), least_intended=p["intended"])
    keep = cfg.colour == "keep" or (cfg.colour == "auto" and (
        how.get("survival") is None or how["intended"] < p["intended"] or how["survival"] >= how["bar"]))
    how["views"] = "kept" if keep else "dropped"
    if keep:
        return pair, how
    recipe = dict(pair.recipe, views=without_colour(seen)) if ours else pair.recipe
    distill = dict(pair.distill, augment=without_colour(pair.distill["augment"])) if distilled else pair.distill
    return replace(pair, recipe=recipe, distill=distill), how


def refused(e: DfkdError, colour: dict | None) -> DfkdError:
    """A student's refusal to resume, with the way back where the probe dropped the colour views it was made with:
    where a setting that differs (the seen ``views``, a distillation's ``augment``: each only where the probe
    decided it, not views the user gave) is what it was but for its recolouring, not where only something else
    differs."""
    decided = {n for n, of in (("views", "seen views"), ("augment", "distillation views"))
               if colour is not None and of in colour["of"]}
    if colour is None or colour["views"] != "dropped" or not isinstance(e, OtherSettings) or not any(
            name in decided and isinstance(a, str) and without_colour(a) == b for name, a, b in e.differing):
        return e
    way = "--colour keep keeps them" if colour["by"] == "auto" else "without --colour drop they stay"
    return OtherSettings(e.where, f"{e.problem} (this run dropped the colour views: {way})", e.differing)
