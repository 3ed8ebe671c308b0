"""``dfkd run``: the whole pipeline per network pair, with the paper's table beside ours.

For each teacher -> student pair: train the teacher (unless given), record its
metadata, distill a student on real data (``real-kd``) and train one on real labels
(``real-data``) as baselines, then reconstruct and distill for every objective (the
profile's, or the ones asked for). With ``seeds`` > 1 every student is made once per seed
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

from . import distributed
from .checkpoint import load_model, save_model
from .config import DistillConfig, ReconstructConfig, RecordConfig, RunConfig, Runtime, TrainConfig, to_dict
from .distillation import distill
from .errors import DfkdError
from .files import exclusive, read_json, sweep_temps
from .loop import accuracy
from .metadata import load as load_stats
from .metadata import save as save_stats
from .kinds import KINDS
from .models import build_model
from .objectives import OBJECTIVES
from .profiles import PAIRS, PAPER, PROFILES, objectives, recipe
from .reconstruction import reconstruct
from .recording import record
from .results import paper_data, write_results
from .resume import canonical, config_settings, finished
from .runtime import pick_device, seed_everything, setup_threads
from .sources import data_sha256, open_data
from .specs import stats_path
from .synthetic import SyntheticSet
from .training import train

def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def _teacher(cfg: RunConfig, net: str, d: Path, p: dict, dev,
             ranks: distributed.Ranks = distributed.Ranks()) -> tuple[torch.nn.Module, dict, object, float]:
    """The network's teacher (loaded, or trained and saved) and the data fitted to it. The run's own
    teacher is kept only if made with this run's settings; one in ``teachers`` is used as it is."""
    path = Path(cfg.teacher) if cfg.teacher else d / "teacher"
    tc = TrainConfig(epochs=p["teacher_epochs"], seed=cfg.seed)
    settings = {"verb": "run-teacher", "net": net, "data": data_sha256(cfg.data), "config": config_settings(tc)}
    state = d / "state" / "train-teacher.safetensors"
    if cfg.teacher or (path.with_suffix(".json").is_file()
                       and (cfg.teachers or finished(path, settings, cfg.restart, state))):
        model, desc, info = load_model(path)
        if ranks.main and not cfg.teacher:  # left by a run killed after saving the teacher
            state.unlink(missing_ok=True)
        return model.to(dev), desc, open_data(cfg.data, info=info), 0.0
    seed_everything(cfg.seed)
    model, info = build_model(net, open_data(cfg.data).info)
    data = open_data(cfg.data, info=info)
    hist, secs = _timed(train, model.to(dev), data, tc, state_path=state, settings=settings, restart=cfg.restart,
                        rt=_rt(cfg))
    if ranks.main:
        save_model(model.cpu(), d / "teacher", net, {}, info, test_accuracy=hist[-1]["test_accuracy"], history=hist,
                   train_config=to_dict(tc), seconds=secs, settings=canonical(settings))
        state.unlink(missing_ok=True)
    ranks.barrier()
    model, desc, info = load_model(d / "teacher")
    return model.to(dev), desc, data, secs


def _stale(spath: Path, teacher_sha: str | None, conv_stats: str) -> str | None:
    """Why a statistics file cannot serve this run (unreadable, another teacher's, or its conv maps
    recorded per another ``conv_stats``), or None."""
    try:
        meta = load_stats(spath, teacher_sha)
    except DfkdError as e:
        return str(e)
    modes = {layer.get("stat", "unit") for layer in meta.header.get("layers", []) if layer.get("type") == "conv"}
    return f"conv_stats {'/'.join(sorted(modes))} -> {conv_stats}" if modes - {conv_stats} else None


def _student_row(path: Path) -> dict | None:
    return read_json(path.with_suffix(".json")).get("row") if path.with_suffix(".json").is_file() else None


def _configs(name: str, net: str, p: dict, seed: int, cfg: RunConfig) -> tuple:
    """A student's stage configs: ``real-data``: its ``TrainConfig``; ``real-kd``: its ``DistillConfig``
    (affine views labelled by the teacher, cosine lr); an objective: its reconstruction's and its
    distillation's."""
    if name == "real-data":
        return (TrainConfig(epochs=p["baseline_epochs"][net], seed=seed),)
    if name == "real-kd":
        return (DistillConfig(epochs=p["baseline_epochs"][net], augment="affine", schedule="cosine", seed=seed),)
    rc = ReconstructConfig(**dict(recipe(cfg, net), objective=name, batch_size=p["batch_size"], seed=seed))
    return rc, DistillConfig(**dict(p["distill"], seed=seed,
                                    **({"epochs": cfg.epochs} if cfg.epochs else {})))


def _student_settings(name: str, net: str, p: dict, seed: int, cfg: RunConfig, desc: dict, meta) -> dict:
    """What makes a student: its network, objective, seed, data, teacher (and statistics) and configs."""
    confs = [config_settings(c) for c in _configs(name, net, p, seed, cfg)]
    made = len(confs) > 1  # from a synthetic set: its reconstruction and statistics too
    return {"verb": "run-student", "student": PAIRS[net], "objective": name, "seed": seed,
            "data": data_sha256(cfg.data),
            "teacher_sha256": desc.get("sha256"), "config": confs[-1], "reconstruct": confs[0] if made else None,
            "stats_sha256": meta.header.get("tensors_sha256") if made else None}


def _rt(cfg: RunConfig) -> Runtime:
    """How the run's stages run: its device and progress (the ranks are torchrun's)."""
    return Runtime(device=cfg.device, progress=cfg.progress)


def _state(d: Path, name: str, tag: str) -> Path:
    return d / "state" / f"{name if name.startswith('real') else 'distill-' + name}{tag}.safetensors"


def _baseline(kind: str, teacher, data, student_name: str, settings: dict, seed: int, cfg: RunConfig, d: Path, dev,
              tag: str, conf) -> dict:
    """``real-data``: train the student on the true labels; ``real-kd``: distill it on the real images."""
    seed_everything(seed)
    student = build_model(student_name, data.info)[0].to(dev)
    resume = {"state_path": _state(d, kind, tag), "settings": settings, "restart": cfg.restart, "rt": _rt(cfg)}
    if kind == "real-data":
        hist, secs = _timed(train, student, data, conf, **resume)
    else:
        hist, secs = _timed(distill, student, data.train, teacher, conf, data, data.info, **resume)
    return {"history": hist, "seconds": {"train" if kind == "real-data" else "distill": secs}, "model": student,
            "image_steps": 0, "student_steps": conf.epochs * -(-len(data.train) // 64)}


def _objective(name: str, teacher, meta, data, student_name: str, settings: dict, seed: int, cfg: RunConfig,
               d: Path, dev, tag: str, rc: ReconstructConfig, dc: DistillConfig) -> dict:
    reconstruct(teacher, meta, d / "synthetic" / f"{name}{tag}", rc, data.info, cfg.restart, _rt(cfg))
    synth = SyntheticSet(d / "synthetic" / f"{name}{tag}").open()
    seed_everything(seed)
    student = build_model(student_name, data.info)[0].to(dev)
    hist, dsecs = _timed(distill, student, synth, teacher, dc, data, data.info, _state(d, name, tag),
                         settings=settings, restart=cfg.restart, rt=_rt(cfg))
    return {"history": hist, "model": student, "image_steps": synth.manifest.get("image_steps", 0),
            "student_steps": dc.epochs * -(-len(synth) // dc.batch_size),
            "saved": {"objective": name, "reconstruct_config": to_dict(rc), "distill_config": to_dict(dc),
                      "synthetic": str(synth.dir)},
            # summed over shards, so that a resumed run still reports the whole reconstruction
            "seconds": {"reconstruct": sum(s["seconds"] for s in synth.manifest["shards"]), "distill": dsecs}}


def run(cfg: RunConfig = RunConfig()) -> Path:
    """Run the pipeline; returns the path of ``results.json``."""
    if cfg.profile not in PROFILES:
        raise DfkdError("profile", f"unknown profile {cfg.profile!r}; choose one of {', '.join(PROFILES)}")
    bad = [n for n in cfg.networks if n not in PAIRS]
    if bad or not cfg.networks:
        raise DfkdError("networks", f"unknown network(s) {bad}; choose from {', '.join(PAIRS)}")
    bad = [o for o in cfg.objectives or () if o not in OBJECTIVES]
    if bad:
        raise DfkdError("objectives", f"unknown objective(s) {bad}; choose from {', '.join(OBJECTIVES)}")
    # dfkd run records the default kinds only (its statistics are shared by every objective of a network)
    extra = [o for o in cfg.objectives or () if OBJECTIVES[o].kind not in (None, *KINDS)]
    if extra:
        k = OBJECTIVES[extra[0]].kind
        raise DfkdError("objectives", f"{', '.join(extra)}: dfkd run records only the default kinds "
                        f"({', '.join(KINDS)}); record {k} with dfkd record --kinds {k} and use dfkd reconstruct")
    if (cfg.images is not None and cfg.images <= 0) or (cfg.steps is not None and cfg.steps < 0):
        raise DfkdError("images", "images must be > 0 and steps >= 0")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise DfkdError("epochs", "must be > 0")
    if cfg.seeds < 1:
        raise DfkdError("seeds", "must be >= 1")
    if cfg.teacher and len(cfg.networks) != 1:
        raise DfkdError("teacher", "a given teacher needs exactly one network")
    setup_threads()
    cfg = replace(cfg, out=cfg.out or f"runs/{cfg.profile}")  # results.json states where the run went
    p, dev, out, t0 = PROFILES[cfg.profile], pick_device(cfg.device), Path(cfg.out), time.perf_counter()
    # under torchrun: every training step data-parallel, the shards split over the ranks; rank 0 writes
    ranks = distributed.group(cfg.device)
    cfg = replace(cfg, progress=cfg.progress and ranks.main)
    with exclusive(out, folder=True, tag=ranks.tag):
        if cfg.teachers:  # teachers trained in another folder: a killed run's temp files there too
            sweep_temps(cfg.teachers, recursive=True)
        rows: list[dict] = []
        for net in cfg.networks:
            d, student_name = out / net, PAIRS[net]
            td = Path(cfg.teachers) / net if cfg.teachers else d
            teacher, desc, data, tsecs = _teacher(cfg, net, td, p, dev, ranks)
            t_acc = accuracy(teacher, data.test)
            spath = stats_path(td / "teacher") if not cfg.teacher else stats_path(cfg.teacher)
            rsecs = 0.0
            own = not (cfg.teacher or cfg.teachers)  # statistics this run recorded: redone with --restart if stale
            why = _stale(spath, desc.get("sha256"), cfg.conv_stats) if ranks.main and spath.is_file() else None
            if why and why.startswith("conv_stats") and not (own and cfg.restart):
                raise DfkdError(spath, f"holds statistics recorded with other settings ({why}); "
                                + ("rerun with --restart to record them again, or " if own else "")
                                + f"give --conv-stats {why.split()[1]}")
            if ranks.main and (not spath.is_file() or (own and cfg.restart and why)):
                rc = RecordConfig(conv_stats=cfg.conv_stats)
                meta, rsecs = _timed(record, teacher, data, rc, rt=_rt(cfg))
                save_stats(meta, spath)
            ranks.barrier()
            meta = load_stats(spath, desc["sha256"])
            names = (("real-data", "real-kd") if cfg.baselines else ()) + objectives(cfg, net)
            for name, seed in ((n, cfg.seed + k) for n in names for k in range(cfg.seeds)):
                tag = f"-seed{seed}" if seed else ""
                spath_student = d / "students" / f"{name}{tag}"
                paper = PAPER[net].get(name) if paper_data(cfg) else None  # the paper's figures: on its data only
                paper = None if paper is None else paper / 100
                settings = _student_settings(name, net, p, seed, cfg, desc, meta)
                fresh = not (finished(spath_student, settings, cfg.restart, _state(d, name, tag))
                             and _student_row(spath_student) is not None)
                if not fresh:
                    if ranks.main:  # left by a run killed after saving the student
                        _state(d, name, tag).unlink(missing_ok=True)
                else:
                    confs, at = _configs(name, net, p, seed, cfg), (seed, cfg, d, dev, tag)
                    res = _baseline(name, teacher, data, student_name, settings, *at, *confs) \
                        if name.startswith("real") else _objective(name, teacher, meta, data, student_name, settings,
                                                                   *at, *confs)
                    if ranks.main:  # the rank that measured the test accuracy
                        row = {"teacher": net, "student": student_name, "objective": name, "seed": seed,
                               "accuracy": res["history"][-1]["test_accuracy"], "teacher_accuracy": t_acc,
                               "paper_accuracy": paper, "image_steps": res["image_steps"],
                               "student_steps": res["student_steps"],
                               "seconds": dict(res["seconds"], teacher_train=tsecs, record=rsecs),
                               "history": [h["test_accuracy"] for h in res["history"] if "test_accuracy" in h],
                               "history_epochs": [h["epoch"] for h in res["history"] if "test_accuracy" in h]}
                        save_model(res["model"].cpu(), spath_student, student_name, {}, data.info,
                                   **dict(res.get("saved", {}), test_accuracy=row["accuracy"], objective=name,
                                          teacher_sha256=desc["sha256"], row=row, settings=canonical(settings)))
                        _state(d, name, tag).unlink(missing_ok=True)
                    ranks.barrier()
                row = dict(_student_row(spath_student), paper_accuracy=paper)  # resumed: today's reference figure
                rows.append(row)
                if ranks.main and fresh:  # a student found finished waits for the next one made, or the end
                    write_results(out, rows, cfg, t0, final=False, class_names=data.info.class_names)
                if cfg.progress:
                    print(f"{net} -> {student_name} {name} seed {seed}: {100 * row['accuracy']:.2f}%"
                          + (f" (paper {100 * row['paper_accuracy']:.2f}%)" if row["paper_accuracy"] else ""), flush=True)
        if ranks.main:
            # all rows (left as they were when they hold them already)
            write_results(out, rows, cfg, t0, class_names=data.info.class_names)
        return out / "results.json"
