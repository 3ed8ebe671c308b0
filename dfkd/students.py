"""A student of ``dfkd run``: its stage configs and the settings that make it (``configs``,
``student_settings``), where its resume state goes (``state_path``), and how it is made: a baseline on the
real data (``baseline``), or a data-free student from a synthetic set (``synthetic_student``) or a generator
(``generated``). Each returns what the pipeline's row needs: the history, the model, its steps and seconds."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import DistillConfig, GeneratorConfig, ReconstructConfig, Runtime, to_dict
from .distillation import distill
from .generation import generate, save_generator
from .images import save_grid
from .own import own_settings
from .profiles import Pair, configs
from .reconstruction import reconstruct
from .resume import config_settings
from .run_config import RunConfig
from .runtime import seed_everything
from .sources import data_sha256
from .specs import build_student
from .synthetic import SyntheticSet
from .training import train


def timed(fn, *args, **kw):
    """``fn``'s result and the stage's seconds: this call's wall; for a history of epochs (a training), its epochs'
    walls summed over every process that ran them if more, so that a resumed stage's time is not only its last
    process's."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    secs = time.perf_counter() - t0
    if isinstance(out, list):
        secs = max(secs, sum(r.get("wall", r.get("seconds", 0.0)) for r in out))
    return out, secs


def student_settings(name: str, pair: Pair, seed: int, cfg: RunConfig, desc: dict, meta) -> dict:
    """What makes a student: its network, objective, seed, data, teacher (and statistics) and configs."""
    confs = [config_settings(c) for c in configs(name, pair, seed, cfg)]
    made = len(confs) > 1  # from a synthetic set or a generator: its reconstruction and statistics too
    s = {"verb": "run-student", "student": pair.student, "objective": name, "seed": seed,
         "data": data_sha256(cfg.data),
         "teacher_sha256": desc.get("sha256"), "config": confs[1] if made else confs[0],
         "reconstruct": confs[0] if made else None,
         "stats_sha256": meta.header.get("tensors_sha256") if made and meta is not None else None}
    if len(confs) > 2:  # a run's settings before --synthesis had no such key: its students are still found
        s["generator"] = confs[2]
    return own_settings(s, pair, cfg, desc)


def runtime_of(cfg: RunConfig) -> Runtime:
    """How the run's stages run: its device and progress (the ranks are torchrun's)."""
    return Runtime(device=cfg.device, progress=cfg.progress)


def state_path(d: Path, name: str, tag: str) -> Path:
    return d / "state" / f"{name if name.startswith('real') else 'distill-' + name}{tag}.safetensors"


def baseline(kind: str, teacher, data, pair: Pair, settings: dict, seed: int, cfg: RunConfig, d: Path, dev,
              tag: str, conf) -> dict:
    """``real-data``: train the student on the true labels; ``real-kd``: distill it on the real images."""
    seed_everything(seed)
    student = build_student(pair.student, pair.student_args or {}, data.info).to(dev)
    resume = {"state_path": state_path(d, kind, tag), "settings": settings, "restart": cfg.restart, "rt": runtime_of(cfg)}
    if kind == "real-data":
        hist, secs = timed(train, student, data, conf, **resume)
    else:
        hist, secs = timed(distill, student, data.train, teacher, conf, data, data.info, **resume)
    return {"history": hist, "seconds": {"train" if kind == "real-data" else "distill": secs}, "model": student,
            "image_steps": 0, "student_steps": conf.epochs * -(-len(data.train) // conf.batch_size)}


def generated(name: str, teacher, meta, data, pair: Pair, settings: dict, seed: int, cfg: RunConfig,
               d: Path, dev, tag: str, rc: ReconstructConfig, dc: DistillConfig, gc: GeneratorConfig) -> dict:
    """``--synthesis generator``: a generator trained against the teacher and the student distilled online
    (``generation.generate``); the generator is saved beside the student, with a grid of what it makes."""
    seed_everything(seed)
    student = build_student(pair.student, pair.student_args or {}, data.info).to(dev)
    hist, gen = generate(teacher, meta, student, data.info, rc, dc, gc, data.test, state_path(d, name, tag), settings,
                         cfg.restart, runtime_of(cfg))
    stem = d / "students" / f"{name}{tag}"
    gpath = save_generator(gen.cpu(), stem.with_name(stem.name + ".generator.safetensors"), objective=name,
                           teacher_sha256=settings.get("teacher_sha256"))
    with torch.no_grad():
        k = min(gen.classes, 100)  # ten a class, of the first hundred classes at most
        y = torch.arange(10 * k) % k
        x = gen(torch.randn(len(y), gc.latent, generator=torch.Generator().manual_seed(seed)), y)
    samples = stem.with_name(stem.name + ".samples.png")
    if len(data.info.shape) == 3:
        save_grid(samples, x, y, lo=data.info.low, hi=data.info.high)
    return {"history": hist, "model": student, "image_steps": gc.iterations * gc.batch_size,
            "student_steps": gc.iterations * gc.student_steps,
            "seconds": {"generate": sum(h["seconds"] for h in hist)},  # summed over records: a resumed run's whole
            "samples": samples if samples.is_file() else None,
            "saved": {"objective": name, "synthesis": "generator", "reconstruct_config": to_dict(rc),
                      "distill_config": to_dict(dc), "generator_config": to_dict(gc), "generator": gpath.name}}


def synthetic_student(name: str, teacher, meta, data, pair: Pair, settings: dict, seed: int, cfg: RunConfig,
               d: Path, dev, tag: str, rc: ReconstructConfig, dc: DistillConfig, gc=None) -> dict:
    if gc is not None:
        return generated(name, teacher, meta, data, pair, settings, seed, cfg, d, dev, tag, rc, dc, gc)
    reconstruct(teacher, meta, d / "synthetic" / f"{name}{tag}", rc, data.info, cfg.restart, runtime_of(cfg))
    synth = SyntheticSet(d / "synthetic" / f"{name}{tag}").open()
    seed_everything(seed)
    student = build_student(pair.student, pair.student_args or {}, data.info).to(dev)
    hist, dsecs = timed(distill, student, synth, teacher, dc, data, data.info, state_path(d, name, tag),
                         settings=settings, restart=cfg.restart, rt=runtime_of(cfg))
    return {"history": hist, "model": student, "image_steps": synth.manifest.get("image_steps", 0),
            "student_steps": dc.epochs * -(-len(synth) // dc.batch_size),
            "saved": {"objective": name, "reconstruct_config": to_dict(rc), "distill_config": to_dict(dc),
                      "synthetic": str(synth.dir)},
            # summed over shards, so that a resumed run still reports the whole reconstruction
            "seconds": {"reconstruct": sum(s["seconds"] for s in synth.manifest["shards"]), "distill": dsecs}}
