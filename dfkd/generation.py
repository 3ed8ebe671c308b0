"""``--synthesis generator``: a conditional generator trained against the frozen teacher, and the student
distilled online on its batches (in the manner of CMI and Fast-Datafree), instead of optimising each input.

Each generator step draws ``batch_size`` latents ``z ~ N(0, I)`` for two copies of a class-balanced run of
labels ``y``, makes raw inputs ``x = G(z, y)`` and descends, per sample,
``objective(x) / B + priors(x) / B + ce * CE(teacher(x), y) - disagreement * D(student(x), teacher(x))
- diversity * MS(x, z)``: the reconstruction's objective (its metadata or BatchNorm terms) and priors,
the cross-entropy of the intended labels, the student-teacher disagreement (``losses.disagreement``) and the
mode-seeking diversity (``losses.mode_seeking``, on the network's view of ``x``), the teacher frozen in eval mode and the student in eval
mode (its BatchNorm statistics untouched). The batch joins a memory bank of the last ``bank`` inputs; then
``student_steps`` steps distil the student on batches drawn from the bank, each augmented by the
distillation's views and labelled by the teacher (``kd_loss``), the student's lr annealed over the whole run
(``student_schedule``: cosine, as CMI and Fast-Datafree do, or constant).

Step ``i`` draws everything from a generator seeded from ``(seed, i)``, so a run resumed from its state
(generator, student, bank and optimiser, written every ``eval_every`` steps; ``resume``) equals an
uninterrupted one bit for bit; one of other settings is refused, or with ``restart`` started over.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .config import DistillConfig, GeneratorConfig, ReconstructConfig, Runtime
from .data import DataInfo, at_input
from .errors import DfkdError
from .files import parse_json, weights_sha256
from .fastgrad import input_grad_by_fold
from .generators import Generator, build
from .inversion import revealed_means
from .loop import accuracy, nonfinite
from .losses import check_seams, disagreement, kd_loss, mode_seeking, prior, seam_prior
from .metadata import Metadata
from .models import device_of, num_outputs
from .objectives import Noise, make_objective
from .resume import canonical, config_settings, load_checked, load_state, save_checked, save_state
from .runtime import bars_off, whole
from .taps import tap
from .views import AUGMENTS, AUGMENT_FORM, SEEN, SEEN_FORM, augment, jitter, seen

REMEDY = "delete it to make it again, or rerun with --restart"


class Bank(nn.Module):
    """The memory bank: a ring of the last ``capacity`` generated raw inputs, as buffers (so that it is
    part of the resume state)."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("x", torch.zeros(capacity, *shape))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))

    def add(self, x: torch.Tensor) -> None:
        cap, n = len(self.x), len(x)
        x = x[-cap:]  # more than the bank holds: its last ``cap``
        idx = (int(self.pos) + n - len(x) + torch.arange(len(x))) % cap
        self.x[idx.to(self.x.device)] = x
        self.pos.fill_((int(self.pos) + n) % cap)
        self.filled.fill_(min(cap, int(self.filled) + n))

    def draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        return self.x[torch.randint(int(self.filled), (n,), generator=g).to(self.x.device)]


def _step_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dfkd-generate|{seed}|{i}".encode()).digest()[:8], "little") >> 1


def _check(rc: ReconstructConfig, dc: DistillConfig, gc: GeneratorConfig) -> None:
    if gc.iterations <= 0 or gc.bank <= 0 or gc.student_steps < 0 or gc.eval_every <= 0:
        raise DfkdError("generator", "iterations, bank and eval_every must be > 0 and student steps >= 0")
    if gc.batch_size < 2 or gc.batch_size % 2:
        raise DfkdError("generator", f"its batch must be even and >= 2 (two latents per label), not {gc.batch_size}")
    if not all(math.isfinite(v) and v >= 0 for v in (gc.ce, gc.disagreement, gc.diversity, rc.tv, rc.l2, rc.jitter)):
        raise DfkdError("generator", "the ce, disagreement, diversity, tv, l2 and jitter weights must be finite and >= 0")
    if not (gc.lr > 0 and dc.lr > 0):
        raise DfkdError("generator", "the generator's and the student's lr must be > 0")
    if rc.basis != "pixel":
        raise DfkdError("basis", f"a generator makes its inputs itself; the {rc.basis} basis is the optimised inputs' "
                        "(--synthesis optimise)")
    if not max(gc.lr, dc.lr) * 10 < torch.finfo(torch.float32).max:  # Adam's first step is 10 x lr
        raise DfkdError("generator", "an lr that large does not fit Adam's first step in float32")
    if dc.augment not in AUGMENTS:
        raise DfkdError("augment", f"{dc.augment!r} is not {AUGMENT_FORM}")
    if dc.average:
        raise DfkdError("average", "averages epochs on a synthetic set, which a generator does not make")
    if rc.views not in SEEN:
        raise DfkdError("views", f"{rc.views!r} is not {SEEN_FORM}")
    check_seams(rc.patch_tv, rc.patch)
    if gc.student_schedule not in ("cosine", "constant"):
        raise DfkdError("student_schedule", f"{gc.student_schedule!r} is not cosine or constant")


def generator_loss(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, teacher: nn.Module, student: nn.Module,
                   objective, acts: dict, info: DataInfo, rc: ReconstructConfig, gc: GeneratorConfig,
                   g: torch.Generator) -> torch.Tensor:
    """The generator's loss on its batch ``x = G(z, y)`` (raw): the objective and priors per sample, the
    intended labels' cross-entropy, less the disagreement and the diversity (the module's equation). The
    teacher's layers are read through ``acts`` (a ``tap`` on the objective's layers); both networks see
    ``x`` under ``rc.views`` (``views.seen``), normalised and, with ``jitter``, rolled (one shift per batch, all
    drawn from ``g``); the priors and the diversity act on ``x`` itself, normalised, the seam prior on what the
    teacher sees."""
    xn = info.to_model(x)
    xin = jitter(info.to_model(seen(x, rc.views, g, info.low, info.high)) if rc.views != "none" else xn, rc.jitter, g)
    logits = teacher(xin)
    tg = {k: v.to(x.device) for k, v in objective.targets(y.cpu(), g).items()}
    loss = (objective.loss(logits, acts, tg, y) + prior(xn, rc.tv, rc.l2) + seam_prior(xin, rc.patch_tv, rc.patch)) \
        / len(y) + gc.ce * F.cross_entropy(logits, y)
    if gc.disagreement:
        loss = loss - gc.disagreement * disagreement(student(xin), logits).mean()
    if gc.diversity:
        loss = loss - gc.diversity * mode_seeking(xn, z)
    return loss


def _diverged(what: str, history: list[dict], state_path: Path | None) -> DfkdError:
    kept = f"; the resume state after step {history[-1]['epoch']} is kept" if history and state_path else ""
    return DfkdError("lr", f"{what}: nothing of it was saved{kept} (a smaller generator or student lr may help)")


def generate(teacher: nn.Module, meta: Metadata | None, student: nn.Module, info: DataInfo,
             rc: ReconstructConfig = ReconstructConfig(objective="bn-stats"), dc: DistillConfig = DistillConfig(),
             gc: GeneratorConfig = GeneratorConfig(), test=None, state_path: Path | None = None,
             settings: dict | None = None, restart: bool = False,
             rt: Runtime = Runtime()) -> tuple[list[dict], Generator]:
    """Train a generator for ``rc.objective`` against ``teacher`` (and ``meta``, where the objective reads
    statistics) and distil ``student`` on its batches; returns the history (a record every ``eval_every``
    steps and after the last, with ``test``'s accuracy if given) and the generator. Both networks see the raw
    inputs through ``info``'s normalisation; the teacher is frozen, the student trained in place."""
    whole(rt, "generate")
    _check(rc, dc, gc)
    if distributed.current().world > 1:
        raise DfkdError("generate", "a generator is trained in one process; run it without torchrun")
    objective = make_objective(rc.objective, meta, teacher, rc)
    if isinstance(objective, Noise) or hasattr(objective, "masks"):
        raise DfkdError("objective", f"{rc.objective} cannot train a generator (noise optimises nothing; dropout "
                        "masks are per optimised input): use another objective, or --synthesis optimise")
    dev = device_of(teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if meta is not None and meta.header.get("teacher_sha256") != weights_sha256(teacher.state_dict()):
        raise DfkdError(meta.path or "stats", "recorded on another teacher (weights sha256 differs)")
    classes = meta.num_classes if meta is not None else num_outputs(teacher, info)
    start = revealed_means(teacher, meta) if meta is not None and rc.init != "noise" else None
    if start is None and rc.init == "class-mean":
        raise DfkdError("init", "the statistics reveal no class mean inputs (that needs an all-layers record of a "
                        "layer affine in the input, of full column rank); use init noise or auto")
    torch.manual_seed(gc.seed)
    gen = Generator(info.shape, classes, gc.latent, gc.width, info.low, info.high, start).to(dev)
    bank = Bank(gc.bank, info.shape).to(dev)
    held = nn.ModuleDict({"generator": gen, "student": student, "bank": bank})
    gparams, sparams = list(gen.parameters()), list(student.parameters())
    opt = torch.optim.Adam([{"params": gparams, "lr": gc.lr, "betas": (0.5, 0.999)},
                            {"params": sparams, "lr": dc.lr}])
    # ``epochs``: the steps a finished state holds (``resume.finished`` then saves the student again, not redoes it)
    settings = canonical(dict(settings or {}, generator=config_settings(gc), reconstruct=config_settings(rc),
                              distill=config_settings(dc), epochs=gc.iterations))
    start, history = load_state(state_path, held, opt, settings, restart)
    net_t, net_s = at_input(teacher, info), at_input(student, info)
    tloss = sloss = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=gc.iterations - start, desc=f"generate {rc.objective}", disable=bars_off(rt.progress), leave=False)
    with tap(teacher, objective.layers(), inputs=objective.inputs()) as acts, \
            input_grad_by_fold(teacher, dev.type == "cpu"):
        for it in range(start, gc.iterations):
            g = torch.Generator().manual_seed(_step_seed(gc.seed, it))
            torch.manual_seed(_step_seed(gc.seed, it))  # the networks' own draws (dropout)
            half = gc.batch_size // 2
            y = ((torch.arange(half) + it * half) % classes).repeat(2)
            z = torch.randn(len(y), gc.latent, generator=g).to(dev)
            # the generator's step
            gen.train()
            student.eval()
            x = gen(z, y.to(dev))
            loss = generator_loss(x, z, y.to(dev), teacher, student, objective, acts, info, rc, gc, g)
            bad = nonfinite(loss)
            if bad:
                raise _diverged(f"the generator's loss became {bad} at step {it + 1}", history, state_path)
            opt.zero_grad(set_to_none=True)
            for p, gr in zip(gparams, torch.autograd.grad(loss, gparams)):
                p.grad = gr
            opt.step()
            bank.add(x.detach())
            tloss += loss.item()
            # the student's steps, on the bank, labelled by the teacher
            student.train()
            if gc.student_schedule == "cosine":
                opt.param_groups[1]["lr"] = dc.lr * 0.5 * (1.0 + math.cos(math.pi * it / gc.iterations))
            for _ in range(gc.student_steps):
                xb = augment(bank.draw(dc.batch_size, g), dc.augment, g, lo=info.low, hi=info.high)
                with torch.no_grad():
                    tb = net_t(xb)
                s = kd_loss(net_s(xb), tb, dc.temperature)
                bad = nonfinite(s)
                if bad:
                    raise _diverged(f"the student's loss became {bad} at step {it + 1}", history, state_path)
                opt.zero_grad(set_to_none=True)
                s.backward()
                opt.step()
                sloss += s.item() / max(gc.student_steps, 1)
            bar.update(1)
            done = it + 1
            if done % gc.eval_every == 0 or done == gc.iterations:
                k = done - (history[-1]["epoch"] if history else 0)
                rec = {"epoch": done, "loss": tloss / k, "student_loss": sloss / k}
                if test is not None:
                    rec["test_accuracy"] = accuracy(net_s, test)
                    student.train()
                rec["seconds"] = time.perf_counter() - t0  # since the last record: its steps and this test
                history.append(rec)
                tloss = sloss = 0.0
                if rt.progress:
                    tqdm.write(f"generate step {done}/{gc.iterations}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in rec.items() if k != "epoch"))
                if state_path is not None:
                    save_state(state_path, held, opt, done, history, settings)
                t0 = time.perf_counter()
    bar.close()
    student.eval()
    gen.eval()
    return history, gen


def save_generator(gen: Generator, path: str | Path, **extra) -> Path:
    """Write ``gen`` as ``<path>`` (safetensors): its weights, and in the header its description and
    ``extra``, sealed by their sha256; written atomically."""
    body = json.dumps({"format": "dfkd-generator", "version": 1, "generator": gen.describe(), **extra}, sort_keys=True)
    save_checked(path, {k: v.detach().cpu().contiguous() for k, v in gen.state_dict().items()}, body)
    return Path(path)


def load_generator(path: str | Path) -> tuple[Generator, dict]:
    """A generator saved by ``save_generator`` and its header, verified against its sha256 (never code)."""
    tensors, body = load_checked(path, REMEDY)
    doc = parse_json(body, path)
    if not (isinstance(doc, dict) and doc.get("format") == "dfkd-generator" and doc.get("version") == 1
            and isinstance(doc.get("generator"), dict)):
        raise DfkdError(path, "not a dfkd generator file (of version 1)")
    with torch.device("meta"):  # the description's shapes, nothing allocated: compared with the file's first
        shell = build(doc["generator"], path)
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    if want != {k: tuple(v.shape) for k, v in tensors.items()}:
        raise DfkdError(path, "its weights do not fit its description (other names or shapes)")
    gen = build(doc["generator"], path)
    gen.load_state_dict(tensors, strict=True)
    return gen.eval(), doc
