"""``dfkd run``: the whole pipeline per network pair, with the paper's table beside ours.

For each teacher -> student pair (``profiles.pairs``: the paper's networks, or with ``student`` the user's
own): train the teacher (unless given), record its metadata (unless given a teacher: then its statistics
file is read where there is one), distill a student on real data (``real-kd``) and train one on real labels
(``real-data``) as baselines, then reconstruct and distill for every objective (the
profile's, the ones asked for, or for the user's own pair the one its teacher's offer calls for; its colour
views kept or dropped first, ``colour.decide``). With ``seeds`` > 1 every student is made once per seed
(seeds ``seed``, ``seed + 1``, ...; the teacher and its statistics are shared): reconstruction,
distillation and the baselines' training all follow the seed. Every stage skips finished work,
so an interrupted run resumes where it stopped; work made with other settings (the run's own
teacher, a synthetic set, a student, a resume state) is refused, or with ``restart`` made again.
``results.json`` and ``results.md`` (``results``) are written atomically after every student made and at
the end, and left as they were when they already hold the same rows.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import budget, distributed
from .colour import check_colour, decide, refused
from .checkpoint import load_model, save_model
from .config import ReconstructConfig, RecordConfig, TrainConfig, to_dict
from .errors import DfkdError
from .exporting import to_onnx
from .inference import deploy_module
from .files import exclusive, read_json, sweep_temps
from .data import at_input
from .loop import accuracy
from .metadata import load as load_stats
from .metadata import save as save_stats
from .models import build_model, code_sha256, device_of
from .kinds import default_kinds
from .objectives import make_objective, needs
from .own import given_statistics, offered
from .profiles import Pair, configs, given_teacher, objectives, pairs
from .recipes import PAPER
from .recording import record
from .results import paper_data, write_results
from .run_config import RunConfig
from .students import baseline, runtime_of, state_path, student_settings, synthetic_student, timed
from .resume import canonical, config_settings, finished
from .runtime import pick_device, seed_everything, setup_threads
from .shipping import ship
from .sources import data_sha256, open_data
from .specs import DataRef, build_student, open_with_data, stats_path
from .training import train
from .views import require_images


def _code(spec: str, pair: Pair, cfg: RunConfig) -> tuple[str, ...]:
    """The code a saved network of the pair may import: its own file (a user's pair), then what the user named."""
    return tuple(c for c in (spec.rpartition(":")[0],) if c and pair.own) + cfg.code


def _teacher(cfg: RunConfig, pair: Pair, d: Path, dev,
             ranks: distributed.Ranks = distributed.Ranks()) -> tuple[torch.nn.Module, dict, object, float]:
    """The pair's teacher (given, or trained and saved) and the data fitted to it. The run's own teacher is
    kept only if made with this run's settings; one in ``teachers`` is used as it is."""
    m = given_teacher(cfg)
    if m is not None:
        model, desc, data = open_with_data(replace(m, args=pair.teacher_args or {}),
                                           DataRef(cfg.data, None, cfg.normalize))
        return model.to(dev), desc, data, 0.0
    path, tc = d / "teacher", TrainConfig(epochs=pair.teacher_epochs, seed=cfg.seed)
    settings = {"verb": "run-teacher", "net": pair.teacher, "data": data_sha256(cfg.data), "config": config_settings(tc)}
    if pair.own:
        settings.update(args=pair.teacher_args, normalize=cfg.normalize, code_sha256=code_sha256(pair.teacher))
    code = _code(pair.teacher, pair, cfg)
    state = d / "state" / "train-teacher.safetensors"
    if path.with_suffix(".json").is_file() and (cfg.teachers or finished(path, settings, cfg.restart, state)):
        model, desc, info = load_model(path, code)
        if ranks.main:  # left by a run killed after saving the teacher
            state.unlink(missing_ok=True)
        return model.to(dev), desc, open_data(cfg.data, info=info), 0.0
    seed_everything(cfg.seed)
    model, info = build_model(pair.teacher, open_data(cfg.data, normalize=cfg.normalize).info,
                              **(pair.teacher_args or {}))
    data = open_data(cfg.data, info=info)
    hist, secs = timed(train, model.to(dev), data, tc, state_path=state, settings=settings, restart=cfg.restart,
                        rt=runtime_of(cfg))
    if ranks.main:
        save_model(model.cpu(), path, pair.teacher, pair.teacher_args or {}, info,
                   test_accuracy=hist[-1]["test_accuracy"], history=hist, train_config=to_dict(tc), seconds=secs,
                   settings=canonical(settings))
        state.unlink(missing_ok=True)
    ranks.barrier()
    model, desc, info = load_model(path, code)
    return model.to(dev), desc, data, secs


def _stale(spath: Path, teacher_sha: str | None, conv_stats: str, teacher: nn.Module, example: torch.Tensor,
           pair: bool) -> str | None:
    """Why a statistics file cannot serve this run (unreadable, another teacher's, its conv maps recorded per
    another ``conv_stats`` (a first layer per unit aside), or, for a user's pair, without the norm-stats its
    teacher offers (``example``: a batch of its inputs) or with its first layer pooled), or None."""
    try:
        meta = load_stats(spath, teacher_sha)
    except DfkdError as e:
        return str(e)
    layers = meta.header.get("layers", [])
    modes = {layer.get("stat", "unit") for k, layer in enumerate(layers)
             if layer.get("type") == "conv" and not (k == 0 and layer.get("stat") == "unit")}
    if modes - {conv_stats}:
        return f"conv_stats {'/'.join(sorted(modes))} -> {conv_stats}"
    if pair and "norm-stats" in default_kinds(teacher, example) and "norm-stats" not in meta.kinds:
        return "kinds without norm-stats"
    if pair and layers and layers[0].get("stat") != "unit":
        return "first_layer pooled -> unit"
    return None


def _statistics(cfg: RunConfig, td: Path, teacher, desc: dict, data, ranks: distributed.Ranks):
    """The teacher's statistics, the seconds spent recording them, and their path. A teacher the run trained
    (or found in ``teachers``, or a registry network's given teacher) has them recorded where missing; a user's
    own given teacher's are read from ``stats`` or beside it, never recorded (``own.given_statistics``)."""
    if cfg.student is not None and given_teacher(cfg) is not None:
        meta, spath = given_statistics(cfg, desc, data.info)
        return meta, 0.0, spath
    given = given_teacher(cfg) is not None  # else the run's own teacher (trained here, or in ``teachers``)
    spath = stats_path(cfg.teacher) if given else stats_path(td / "teacher")
    rsecs = 0.0
    own = not (given or cfg.teachers)  # statistics this run recorded: redone with --restart if stale
    pair = cfg.student is not None
    example = torch.zeros(7, *data.info.shape, device=device_of(teacher))
    why = _stale(spath, desc.get("sha256"), cfg.conv_stats, teacher, example, pair) \
        if ranks.main and spath.is_file() else None
    if why and why.split()[0] in ("conv_stats", "kinds", "first_layer") and not (own and cfg.restart):
        raise DfkdError(spath, f"holds statistics recorded with other settings ({why}); "
                        + ("rerun with --restart to record them again" if own else "record them again")
                        + (f", or give --conv-stats {why.split()[1]}" if why.startswith("conv_stats") else ""))
    if ranks.main and (not spath.is_file() or (own and cfg.restart and why)):
        # a user's pair: the first layer per unit, whose class means give the class-mean inputs (the start)
        rc = RecordConfig(conv_stats=cfg.conv_stats, first_layer="unit" if pair else "pooled")
        meta, rsecs = timed(record, teacher, data, rc, rt=runtime_of(cfg))
        save_stats(meta, spath)
    ranks.barrier()
    return load_stats(spath, desc["sha256"]), rsecs, spath


def _student_row(path: Path) -> dict | None:
    return read_json(path.with_suffix(".json")).get("row") if path.with_suffix(".json").is_file() else None


def _preflight(cfg: RunConfig, pair: Pair) -> RunConfig:
    """An own pair checked before anything is written (the lock, the folder, minutes of training): the teacher's
    offer and the objectives it serves, and the student built on the data. Returns ``cfg`` with what decided the
    run pinned (its objectives, a given teacher's statistics file), so that the report's command makes it again."""
    given = given_teacher(cfg) is not None
    if given:
        teacher, desc, data, _ = _teacher(cfg, pair, Path("."), "cpu")
        meta, spath = given_statistics(cfg, desc, data.info)
    else:  # trained here, its statistics then recorded (the default kinds)
        data = open_data(cfg.data, normalize=cfg.normalize)
        teacher, info = build_model(pair.teacher, data.info, **(pair.teacher_args or {}))
        data, meta, spath = open_data(cfg.data, info=info), None, None
    names = offered(cfg, teacher, meta, meta is not None or not given, spath, torch.zeros(7, *data.info.shape))
    student = build_student(pair.student, pair.student_args or {}, data.info)
    outs = []
    for what, net in (("teacher", at_input(teacher, data.info)), ("student", student)):
        try:
            with torch.no_grad():
                outs.append(net.eval()(torch.zeros(2, *data.info.shape)).shape[-1])
        except Exception as e:  # the user's code can raise anything
            raise DfkdError(what, f"{getattr(pair, what)} does not take the data's inputs of shape "
                            f"{data.info.shape} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if outs[0] != outs[1]:
        raise DfkdError("student", f"{pair.student} gives {outs[1]} outputs, the teacher {outs[0]}")
    if cfg.basis == "fourier" and len(data.info.shape) != 3:  # found now, not after the teacher and baselines
        raise DfkdError("basis", f"the Fourier basis is for images [C, H, W], not inputs of shape {list(data.info.shape)}")
    if cfg.export != "none":  # a student ONNX cannot express is found now, not after its training
        try:
            to_onnx(student, data.info)
        except DfkdError as e:  # the student's own failure; the exporter's or the runtime's stays as it is
            if e.where != "model":
                raise
            raise DfkdError("student", f"{pair.student} {e.problem} (--export {cfg.export})") from None
    for o in names:
        if meta is not None or not needs(o):
            make_objective(o, meta, teacher, ReconstructConfig(**dict(pair.recipe_for(o), objective=o)))
    return replace(cfg, objectives=names, **({"stats": str(spath)} if meta is not None and not cfg.stats else {}))


CONFIGS = {"TrainConfig": "train", "ReconstructConfig": "reconstruct", "DistillConfig": "distill",
           "GeneratorConfig": "generator"}  # a row's configs, by what each is of


def run(cfg: RunConfig = RunConfig()) -> Path:
    """Run the pipeline; returns the path of ``results.json``."""
    todo = pairs(cfg)  # or refused, in one line
    check_colour(cfg)
    budget.check_minutes(cfg)
    plain = open_data(cfg.data)  # as it is (normalisation pinned later), before anything is trained
    if plain.test is None:
        raise DfkdError("data", f"{cfg.data} has no test split, and dfkd run measures every model on one (an npz "
                        "holds it as x_test and y_test, a folder as DIR/test/<class>/)")
    if cfg.augment is not None:  # every pair's data-free students
        require_images(cfg.augment, plain.info.shape)
    if cfg.export != "none":  # the deploy extra, before anything is trained
        for name in ("onnx", "onnxscript", "onnxruntime.quantization"):
            deploy_module(name)
    if todo[0].own:
        cfg = _preflight(cfg, todo[0])
    setup_threads()
    cfg = replace(cfg, out=cfg.out or f"runs/{cfg.profile}")  # results.json states where the run went
    dev, out, t0 = pick_device(cfg.device), Path(cfg.out), time.perf_counter()
    # under torchrun: every training step data-parallel, the shards split over the ranks; rank 0 writes
    ranks = distributed.group(cfg.device)
    cfg = replace(cfg, progress=cfg.progress and ranks.main)
    with exclusive(out, folder=True, tag=ranks.tag):
        if cfg.teachers:  # teachers trained in another folder: a killed run's temp files there too
            sweep_temps(cfg.teachers, recursive=True)
        rows: list[dict] = []
        for pair in todo:
            d = out / pair.name
            td = Path(cfg.teachers) / pair.name if cfg.teachers else d
            teacher, desc, data, tsecs = _teacher(cfg, pair, td, dev, ranks)
            t_acc = accuracy(teacher, data.test)
            meta, rsecs, spath = _statistics(cfg, td, teacher, desc, data, ranks)
            names = (("real-data", "real-kd") if cfg.baselines else ()) + \
                (cfg.objectives if pair.own else objectives(cfg, pair.name))  # own: pinned by the preflight
            free = [n for n in names if not n.startswith("real")]  # an own pair's colour views, then (--minutes)
            colour, budgets = None, {}  # each objective's sizes: decided before any student, the probe the first's
            if pair.own and free:
                pair, colour = decide(cfg, pair, teacher, meta, data.info, d, ranks, cfg.device, desc.get("sha256"))
            for k, name in enumerate(free if cfg.minutes else ()):
                pair, budgets[name] = budget.fit(cfg, pair, name, teacher, meta, data, d, None if k else colour,
                                                 desc.get("sha256"))
            for name, seed in ((n, cfg.seed + k) for n in names for k in range(cfg.seeds)):
                tag = f"-seed{seed}" if seed else ""
                spath_student = d / "students" / f"{name}{tag}"
                paper = PAPER[pair.name].get(name) if paper_data(cfg) and not pair.own else None  # on its data only
                paper = None if paper is None else paper / 100
                settings = student_settings(name, pair, seed, cfg, desc, meta)
                try:  # work made with other settings (finished or half made) refused, with the colour hint
                    fresh = not (finished(spath_student, settings, cfg.restart, state_path(d, name, tag))
                                 and _student_row(spath_student) is not None)
                    confs, at = configs(name, pair, seed, cfg), (seed, cfg, d, dev, tag)
                    res = None if not fresh else (baseline(name, teacher, data, pair, settings, *at, *confs)
                                                  if name.startswith("real") else
                                                  synthetic_student(name, teacher, meta, data, pair, settings, *at, *confs))
                except DfkdError as e:
                    raise refused(e, colour) from None
                if not fresh:
                    if ranks.main:  # left by a run killed after saving the student
                        state_path(d, name, tag).unlink(missing_ok=True)
                else:
                    if ranks.main:  # the rank that measured the test accuracy
                        row = {"teacher": pair.teacher, "student": pair.student, "objective": name, "seed": seed,
                               "accuracy": res["history"][-1]["test_accuracy"], "teacher_accuracy": t_acc,
                               "paper_accuracy": paper, "image_steps": res["image_steps"],
                               "student_steps": res["student_steps"],
                               "seconds": dict(res["seconds"], teacher_train=tsecs, record=rsecs),
                               "history": [h["test_accuracy"] for h in res["history"] if "test_accuracy" in h],
                               "history_epochs": [h["epoch"] for h in res["history"] if "test_accuracy" in h],
                               "configs": {CONFIGS[type(c).__name__]: to_dict(c) for c in confs}}  # as made
                        running = [(h["epoch"], h["running_test_accuracy"]) for h in res["history"]
                                   if "running_test_accuracy" in h]
                        if running:  # the kept student is an average (--average): its weights' own accuracy too
                            row["running"] = {"epochs": [e for e, _ in running], "accuracy": [a for _, a in running]}
                        if "saved" in res:  # its synthetic set's (or generator's) grid, for the report
                            row["samples"] = f"{pair.name}/synthetic/{name}{tag}/samples.png" if "samples" not in res \
                                else res["samples"] and str(res["samples"].relative_to(out))
                        if cfg.synthesis != "optimise" and not name.startswith("real"):  # not the baselines
                            row["synthesis"] = cfg.synthesis
                        if colour is not None and not name.startswith("real"):  # its views kept or dropped, and why
                            row["colour"] = colour
                        if name in budgets:  # its sizes, and what chose them
                            row["budget"] = budgets[name]
                        save_model(res["model"].cpu(), spath_student, pair.student, pair.student_args or {}, data.info,
                                   **dict(res.get("saved", {}), test_accuracy=row["accuracy"], objective=name,
                                          teacher_sha256=desc["sha256"], row=row, settings=canonical(settings)))
                        state_path(d, name, tag).unlink(missing_ok=True)
                    ranks.barrier()
                row = dict(_student_row(spath_student), paper_accuracy=paper)  # resumed: today's reference figure
                if cfg.export != "none" and not name.startswith("real") and ranks.main:
                    net = load_model(spath_student, _code(pair.student, pair, cfg))[0]
                    row["deploy"] = ship(spath_student, net, teacher, data, cfg, d / "synthetic" / f"{name}{tag}", seed)
                if cfg.export != "none" and not name.startswith("real"):
                    ranks.barrier()  # the file's latency measured while no other rank trains
                rows.append(row)
                if ranks.main and fresh:  # a student found finished waits for the next one made, or the end
                    write_results(out, rows, cfg, t0, final=False, class_names=data.info.class_names)
                if cfg.progress:
                    print(f"{pair.teacher} -> {pair.student} {name} seed {seed}: {100 * row['accuracy']:.2f}%"
                          + (f" (paper {100 * row['paper_accuracy']:.2f}%)" if row["paper_accuracy"] else ""), flush=True)
        if ranks.main:
            # all rows (left as they were when they hold them already)
            write_results(out, rows, cfg, t0, class_names=data.info.class_names)
        return out / "results.json"
