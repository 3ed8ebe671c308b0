"""``dfkd run --minutes``: a user's pair's synthetic set sized to a time budget.

A recipe's sizes are fixed (3,000 inputs x 120 steps, 100 epochs), and what they cost grows with the teacher and
the student: the same recipe took 12 to 15 minutes a seed on one outside pair, 25 on a wider teacher
(docs/colour.md). With ``--minutes M`` the number of inputs (and where the budget is tight the steps) is chosen
instead, so that each data-free student's making (its
reconstruction and its distillation, the seconds its row reports; for the run's first student also the colour
probe and this measurement) fits ``M`` minutes. Before any student the costs are measured on this machine with
the run's own recipe and models (``measure``): a few of reconstruction's Adam steps on one batch (seconds an
image-step, after the first step), an epoch of distillation on that batch's inputs repeated to the recipe's size
(seconds an input-epoch, after a first epoch that warms up) and a pass over the test split (seconds an evaluation).
Then
(``plan``)::

    n = share * (M * 60 - spent - evaluations * test) / (steps * image_step + epochs * input_epoch)

rounded down to a multiple of the classes, and fewer than ``LEAST`` inputs a class is refused. Where that is
fewer than the recipe's inputs, ``--steps`` is not given and the profile's ``optimise_budget_steps`` are fewer than
the recipe's, the plan is made again at them (60 against 120: a tight budget buys more from more inputs at fewer
steps, docs/colour.md, "Fewer steps, more inputs"; a budget just above the recipe's inputs gets its 120 steps and
about two-thirds the inputs of one just under, on the pairs measured); the epochs and everything else stay the
recipe's. ``share`` (0.8) leaves room for what is not measured (a shard's labels and file, a slower shard: one
outside pair's shards ranged over 7%) and for a measured epoch that runs faster than the run's (colour digits:
0.457 ms an input-epoch measured, 0.64 taken; that run replayed on 80% would have used about 97% of the budget: a
thin margin, not a bound).

The sizes are written to ``<run>/<pair>/budget.json`` with what they were measured on and read back by every
resume, so that a run's sizes (and so its students) do not change with the machine's speed once chosen; another
budget, teacher, statistics, student, recipe or a ``--steps`` given measures again. The report says the sizes and
the ``--images`` and ``--steps`` that make the same students without a budget (``lines``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .averaging import epochs_averaged
from .config import DistillConfig, ReconstructConfig, Runtime
from .data import DataInfo, at_input
from .distillation import distill
from .errors import DfkdError
from .files import read_json, write_json
from .inversion import revealed_means
from .loop import CHUNK, accuracy, tested
from .metadata import Metadata
from .models import code_sha256, device_of, num_outputs
from .objectives import Noise, make_objective
from .profiles import Pair
from .recipes import OWN
from .reconstruction import optimise_batch
from .resume import config_settings
from .run_config import RunConfig
from .sources import data_sha256
from .specs import build_student

SHARE = 0.8  # of the time left, planned (0.9 overran the colour digits: a distillation epoch measured 0.457 ms an
# input, taken 0.64; docs/colour.md, "Fewer steps, more inputs")
STEPS = 5  # reconstruction steps measured (the first one's time is left out)
LEAST = 10  # inputs a class
MOST = 100_000  # minutes (about 70 days)


def check_minutes(cfg: RunConfig) -> None:
    """Refuse, in one line, a ``--minutes`` the run cannot keep."""
    if cfg.minutes is None:
        return
    if not (isinstance(cfg.minutes, (int, float)) and math.isfinite(cfg.minutes) and 0 < cfg.minutes <= MOST):
        raise DfkdError("minutes", f"must be a number > 0 and at most {MOST:,} (got {cfg.minutes!r})")
    if cfg.student is None:
        raise DfkdError("minutes", "sizes your own pair's synthetic set (--teacher and --student); the paper's "
                        "networks run at their profile's sizes")
    if cfg.synthesis != "optimise":
        raise DfkdError("minutes", "sizes a set of optimised inputs; a generator's budget is --iterations")
    if cfg.images is not None:
        raise DfkdError("minutes", "chooses the number of inputs itself: give --minutes or --images, not both")
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise DfkdError("minutes", "is measured in one process; under torchrun give --images")


def evaluations(dc: DistillConfig) -> int:
    """How many test passes a distillation makes: after every ``eval_every``-th epoch and after the last, twice
    where the weights' average is measured beside the weights (``--average``'s epochs)."""
    at = [e for e in range(1, dc.epochs + 1) if tested(e, dc.epochs, dc.eval_every)]
    last = epochs_averaged(dc.average, dc.epochs) if dc.average else 0
    return len(at) + sum(e > dc.epochs - last for e in at)


def plan(seconds: float, spent: float, costs: dict, rc: ReconstructConfig, dc: DistillConfig, classes: int) -> int:
    """The inputs that fit ``seconds`` (``spent`` of them gone), a multiple of ``classes``; 0 where none fit."""
    per = rc.steps * costs["image_step"] + dc.epochs * costs["input_epoch"]
    left = SHARE * (seconds - spent - evaluations(dc) * costs["test"])
    return 0 if left <= 0 or per <= 0 else int(left / per) // classes * classes


class _Ticks:
    """What ``optimise_batch`` takes for a progress bar: the clock's reading after every step."""

    def __init__(self, clock):
        self.clock, self.t = clock, []

    def update(self, _n: int) -> None:
        self.t.append(self.clock())

    def set_postfix(self, **_kw) -> None:
        pass


def measure(teacher: nn.Module, meta: Metadata | None, student: nn.Module, info: DataInfo, rc: ReconstructConfig,
            dc: DistillConfig, test, clock=time.perf_counter) -> dict:
    """This machine's costs for one recipe: seconds an image-step of reconstruction (a batch of ``rc.batch_size``,
    the steps after the first; 0 where nothing is optimised), an input-epoch of distillation (``student``, moved to
    the teacher's device and trained there in place, without weight averaging: an epoch on that batch's inputs warms
    up, then one on them repeated to the recipe's ``n`` inputs, at most a chunk, is timed: on 500 inputs an epoch
    cost 0.68 ms an input, on 3,000 0.82, on 4,800 read from disk 0.81: docs/colour.md, "A time budget") and a pass
    over ``test``; and the seconds the measurement took."""
    t0 = clock()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dev = device_of(teacher)
    student.to(dev)
    objective = make_objective(rc.objective, meta, teacher, rc)
    classes = meta.num_classes if meta is not None else num_outputs(teacher, info)
    labels = torch.arange(rc.batch_size) % classes
    start = revealed_means(teacher, meta) if meta is not None and rc.init != "noise" \
        and not isinstance(objective, Noise) else None
    ticks = _Ticks(clock)
    x, _ = optimise_batch(teacher, objective, labels, replace(rc, steps=STEPS), torch.Generator().manual_seed(rc.seed),
                          info, ticks, start)  # on the host, as a synthetic set's inputs are read
    with torch.no_grad():
        logits = at_input(teacher, info)(x.to(dev)).float().cpu()
    one, quiet = replace(dc, epochs=1, eval_every=1, average=0.0), Runtime(device=str(dev), progress=False)
    distill(student, (x, logits), teacher, one, None, info, rt=quiet)  # warms up
    m = min(max(rc.n, len(x)), CHUNK)  # an epoch of the recipe's size (500 inputs ran cheaper an input than 3,000)
    every = torch.arange(m) % len(x)
    t1 = clock()
    distill(student, (x[every], logits[every]), teacher, one, None, info, rt=quiet)
    t2 = clock()
    accuracy(student, test)  # the time of a pass; its figure is not used
    t3 = clock()
    step = (ticks.t[-1] - ticks.t[0]) / (len(ticks.t) - 1) / len(labels) if len(ticks.t) > 1 else 0.0
    return {"image_step": step, "input_epoch": (t2 - t1) / m, "test": t3 - t2, "seconds": t3 - t0}


def _key(cfg: RunConfig, pair: Pair, name: str, teacher_sha: str | None, meta: Metadata | None, info: DataInfo) -> str:
    """What a size is chosen for: the budget, the teacher's weights and its statistics, the student (its code too),
    the data as the run sees it, the recipe but its size and seed, and whether --steps was given (the budget may
    choose the steps only without it); not the device: a run resumed elsewhere keeps its sizes."""
    rc = config_settings(ReconstructConfig(**dict(pair.recipe_for(name), objective=name)))
    made = {"minutes": cfg.minutes, "teacher": teacher_sha, "student": pair.student, "student_args": pair.student_args,
            "student_code": code_sha256(pair.student),
            "stats": meta.header.get("tensors_sha256") if meta else None, "data": data_sha256(cfg.data),
            "normalize": cfg.normalize, "info": info.as_dict(),
            "reconstruct": {k: v for k, v in rc.items() if k not in ("n", "seed")},
            **({"steps_given": True} if cfg.steps is not None else {}),  # the budget chooses steps only without it
            "distill": {k: v for k, v in config_settings(DistillConfig(**pair.distill)).items() if k != "seed"}}
    return hashlib.sha256(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()


def _pinned(path: Path, doc: dict, name: str, key: str, classes: int) -> dict | None:
    """The sizes ``path`` holds for ``name`` under ``key``, or None; refused in one line where they cannot be a
    run's (a hand edit: not a whole number of inputs, a multiple of the classes and at least ``LEAST`` a class, or
    steps not a whole number >= 0)."""
    how = doc.get(name, {}).get(key) if isinstance(doc.get(name), dict) else None
    if how is None:
        return None
    n, steps = (how.get("images"), how.get("steps")) if isinstance(how, dict) else (None, None)
    whole = [isinstance(v, int) and not isinstance(v, bool) for v in (n, steps)]
    if not (all(whole) and n >= LEAST * classes and n % classes == 0 and steps >= 0):
        raise DfkdError(str(path), f"holds no valid size for {name} (a whole number of inputs, a multiple of the "
                        f"{classes} classes, at least {LEAST} a class, and steps a whole number >= 0): delete it to "
                        "measure again")
    return how


def fit(cfg: RunConfig, pair: Pair, name: str, teacher: nn.Module, meta: Metadata | None, data, d: Path,
        probe: dict | None, teacher_sha: str | None, clock=time.perf_counter) -> tuple[Pair, dict]:
    """``pair`` with objective ``name``'s inputs (and steps) sized to ``cfg.minutes`` (read back from
    ``d/budget.json`` where they were chosen for these settings, else measured and added there: sizes chosen for
    other settings are kept beside them, so that the run they were chosen for still resumes), and what chose them.
    ``probe``: the colour probe's report where its seconds fall in this objective's budget (the run's first)."""
    path, key = d / "budget.json", _key(cfg, pair, name, teacher_sha, meta, data.info)
    doc = read_json(path) if path.is_file() else {}
    classes = meta.num_classes if meta is not None else num_outputs(teacher, data.info)
    how = _pinned(path, doc, name, key, classes)
    if how is None and cfg.steps is not None:  # sizes pinned before a given --steps entered the key: at those steps
        before = _key(replace(cfg, steps=None), pair, name, teacher_sha, meta, data.info)
        old = _pinned(path, doc, name, before, classes)
        how = old if old is not None and old["steps"] == cfg.steps else None
    if how is None:
        rc = ReconstructConfig(**dict(pair.recipe_for(name), objective=name))
        dc = DistillConfig(**pair.distill)
        student = build_student(pair.student, pair.student_args or {}, data.info)
        costs = measure(teacher, meta, student, data.info, rc, dc, data.test, clock)
        probed = float(probe.get("seconds") or 0.0) if isinstance(probe, dict) else 0.0
        spent = costs["seconds"] + probed
        n = plan(60 * cfg.minutes, spent, costs, rc, dc, classes)
        fewer = OWN.get(cfg.profile, {}).get("optimise_budget_steps")
        tight = n < rc.n // classes * classes and costs["image_step"] > 0  # the recipe's inputs do not fit
        if cfg.steps is None and fewer is not None and fewer < rc.steps and tight:  # more inputs at fewer steps
            rc = replace(rc, steps=fewer)
            n = plan(60 * cfg.minutes, spent, costs, rc, dc, classes)
        if n < LEAST * classes:
            per = rc.steps * costs["image_step"] + dc.epochs * costs["input_epoch"]
            raise DfkdError("minutes", f"{cfg.minutes:g} minutes fit {n} inputs of {name} at this machine's costs "
                            f"({per:.3g} s an input: {rc.steps} steps, {dc.epochs} epochs), under {LEAST} a class: "
                            f"give more minutes, {f'or fewer than {rc.steps} --steps, ' if rc.steps else ''}or fewer "
                            "--epochs")
        how = {"minutes": cfg.minutes, "images": n, "steps": rc.steps, "epochs": dc.epochs,
               "evaluations": evaluations(dc), "spent": spent, "probe": probed, "share": SHARE,
               **{k: costs[k] for k in ("image_step", "input_epoch", "test")}, "measure": costs["seconds"],
               "device": str(device_of(teacher))}
        mine = doc.get(name) if isinstance(doc.get(name), dict) else {}
        write_json(path, dict(doc, **{name: dict(mine, **{key: how})}))
    return replace(pair, sized=dict(pair.sized or {}, **{name: {"n": how["images"], "steps": how["steps"]}})), how


def lines(rows: list[dict]) -> list[str]:
    """What sized each objective's inputs (``--minutes``), once per objective."""
    out, seen = [], set()
    for r in rows:
        b = r.get("budget")
        if not isinstance(b, dict) or r.get("objective") in seen:
            continue
        seen.add(r.get("objective"))
        try:
            out.append(f"\n{r['objective']}: {b['images']:,} inputs, fitted to {b['minutes']:g} minutes a student "
                       f"(measured: {1e3 * b['image_step']:.3g} ms an image-step x {b['steps']} steps, "
                       f"{1e3 * b['input_epoch']:.3g} ms an input-epoch x {b['epochs']} epochs, {b['test']:.2f} s a "
                       f"test x {b['evaluations']}; {b['spent']:.0f} s spent first, the probe's and the "
                       f"measurement's); in place of --minutes, --images {b['images']} --steps {b['steps']} makes "
                       "this objective's students again.")
        except (KeyError, TypeError, ValueError):  # a hand-edited document: its rows still shown
            continue
    return out
