"""Cheaper reconstruction steps on a CPU: image-steps/s of ``optimise_batch`` on a user's BatchNorm teacher
(``examples/own_model.py``) under all-layers+bn-stats and the own pair's optimise recipe (its priors and seen
views), fp32 at the recipe's batch (its losses fused: ``dfkd.moments``) against the losses as plain tensor
expressions, larger and smaller batches, bf16 autocast, channels-last memory and ``torch.compile`` (inductor), each measured in this process.

``python -m benchmarks cpu-steps [--teacher SAVED --code FILE] [--data SPEC] [--batch 500] [--steps 10]
[--unit-targets draw|batch] [--out FILE.json]``. Without ``--teacher`` a freshly initialised 3-channel teacher is recorded on the colour
digits of ``examples/colour_digits.py`` made at ``--data``'s folder (throughput does not depend on the
weights; the accuracy columns then say little). What a variant costs in accuracy is read off the inputs it
makes: from the same start and the same random draws, ``--steps`` steps, then the objective's fp32 loss on
them and the teacher's agreement with the intended labels, beside fp32's; and its first step's input
gradient against fp32's (cosine). Variants run in turn (a short untimed call each first, then the timed
one), so a machine busy with something else shifts all rows alike."""
from __future__ import annotations

import argparse
import contextlib
import copy
from dataclasses import replace
import time
from pathlib import Path

import torch

import dfkd
from dfkd.config import ReconstructConfig, RecordConfig, Runtime
from dfkd.files import write_json
from dfkd.moments import unfused
from dfkd.objectives import make_objective
from dfkd.recipes import OWN
from dfkd.reconstruction import optimise_batch
from dfkd.specs import DataRef, ModelRef, build_student, open_with_data
from dfkd.taps import tap

QUIET = Runtime(progress=False)
VARIANTS = ("fp32", "plain losses", "fp32 half batch", "fp32 double batch", "bf16 autocast", "channels-last",
            "channels-last + bf16", "compile (inductor)")


def _teacher(a):
    """The teacher (eval mode) and the data it takes: a saved one, else a fresh own-model teacher."""
    if a.teacher:
        model, _, data = open_with_data(ModelRef(a.teacher, code=(a.code,) if a.code else ()), DataRef(a.data))
        return model.eval(), data
    data = dfkd.open_data(a.data, normalize="auto")
    torch.manual_seed(0)
    return build_student("examples/own_model.py:teacher", {"in_channels": data.info.shape[0]}, data.info).eval(), data


def _context(name: str):
    if name == "plain losses":  # the losses as autograd's tensor expressions, before dfkd.moments fused them
        return unfused()
    return torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in name else contextlib.nullcontext()


def _model(base, name: str):
    m = copy.deepcopy(base)
    if "channels-last" in name:
        m = m.to(memory_format=torch.channels_last)
    if "compile" in name:
        m.compile()  # in place: its modules keep their paths, which the objective's taps name
    return m


def _batch(name: str, b: int) -> int:
    return b // 2 if "half" in name else 2 * b if "double" in name else b


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks cpu-steps", description=__doc__.split("\n\n")[1])
    p.add_argument("--teacher", default=None, help="a saved teacher (default: a fresh examples/own_model.py one)")
    p.add_argument("--code", default=None, help="the teacher's code")
    p.add_argument("--stats", default=None, help="its statistics (default: beside it, else recorded here)")
    p.add_argument("--data", default="folder:data/colour-digits")
    p.add_argument("--batch", type=int, default=500, help="the recipe's batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per call")
    p.add_argument("--unit-targets", default="draw", choices=("draw", "batch"),
                   help="per-unit records matched by draws (the rows in docs/colour.md) or by the batch (dfkd run's "
                   "optimise recipe)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None, help="write the rows as JSON here too (atomically)")
    a = p.parse_args(argv)
    from dfkd.runtime import setup_threads
    setup_threads()
    teacher, data = _teacher(a)
    teacher.requires_grad_(False)  # frozen, as dfkd.reconstruct freezes it (no weight gradients; the CPU fold applies)
    spath = Path(a.stats) if a.stats else (Path(a.teacher + ".stats.safetensors") if a.teacher else None)
    meta = dfkd.metadata.load(spath) if spath and spath.is_file() else \
        dfkd.record(teacher, data, RecordConfig(), rt=QUIET)
    # the own pair's optimise recipe (lr, jitter, tv, the teacher seeing each input under its own affine + colour
    # view), from one noise start whatever the file reveals
    rc = ReconstructConfig(**dict(OWN["quick"]["recipe"], objective="all-layers+bn-stats", steps=a.steps, init="noise",
                                                unit_targets=a.unit_targets))
    obj = make_objective(rc.objective, meta, teacher, rc)
    info, k = data.info, data.info.num_classes
    names = [v.strip() for v in a.variants.split(",")]
    models = {n: _model(teacher, n) for n in names}
    secs = {}
    made = {}
    for rnd, steps in enumerate((2, a.steps)):  # a short untimed call first: compilation, caches, allocator
        for n in names:
            labels = torch.arange(_batch(n, a.batch)) % k
            t0 = time.perf_counter()
            with _context(n):
                x, _ = optimise_batch(models[n], obj, labels, replace(rc, steps=steps), torch.Generator().manual_seed(0),
                                      info)
            if rnd:
                secs[n] = time.perf_counter() - t0
                made[n] = (x, labels)
    ref = secs.get("fp32")
    rows = []
    for n in names:
        x, labels = made[n]
        b = len(labels)
        with torch.no_grad():
            agree = (teacher(info.to_model(x)).argmax(1) == labels).float().mean().item()
        rows.append(dict(variant=n, batch=b, steps=a.steps, image_steps_per_s=b * a.steps / secs[n],
                         ratio=(ref / secs[n]) * (b / a.batch) if ref else None,
                         objective_fp32=_loss(teacher, obj, x, labels, info),
                         agreement=agree, grad_cosine=_cosine(teacher, models[n], obj, n, a.batch, k, info, rc)))
    print("| variant | batch | image-steps/s | vs fp32 | fp32 objective per input on its inputs | teacher agrees | first-step "
          "gradient cosine vs fp32 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['image_steps_per_s']:.0f} | "
              + (f"{r['ratio']:.2f}x" if r["ratio"] else "") + f" | {r['objective_fp32']:.4g} | "
              f"{100 * r['agreement']:.1f}% | {r['grad_cosine']:.6f} |")
    print(f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} timed steps per variant)")
    if a.out:
        write_json(Path(a.out), rows)
    return rows


def _objective(net, obj, x, tg, labels, info) -> torch.Tensor:
    """The objective's value on raw inputs ``x`` through ``net`` (its layers tapped)."""
    with tap(net, obj.layers(), inputs=obj.inputs()) as acts:
        return obj.loss(net(info.to_model(x)), acts, tg, labels)


def _loss(teacher, obj, x, labels, info) -> float:
    """The objective's fp32 value per input (the targets drawn afresh from one seed: the same for every variant)."""
    with torch.no_grad():
        return float(_objective(teacher, obj, x, obj.targets(labels, torch.Generator().manual_seed(1)), labels,
                                info)) / len(labels)


def _cosine(teacher, model, obj, name, b, k, info, rc) -> float:
    """The cosine between this variant's input gradient of the objective and fp32's, at one start."""
    labels = torch.arange(b) % k
    x0 = rc.init_mean + rc.init_std * torch.randn((b, *info.shape), generator=torch.Generator().manual_seed(2))
    tg = obj.targets(labels, torch.Generator().manual_seed(3))
    grads = []
    for net, ctx in ((teacher, contextlib.nullcontext()), (model, _context(name))):
        z = x0.clone().requires_grad_(True)
        with ctx:
            loss = _objective(net, obj, z, tg, labels, info)
        grads.append(torch.autograd.grad(loss.float(), z)[0].flatten())
    return float(torch.nn.functional.cosine_similarity(grads[0].double(), grads[1].double(), dim=0))


if __name__ == "__main__":
    main()
