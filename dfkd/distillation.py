"""``dfkd distill``: Hinton knowledge distillation of a student on a synthetic set.

``L_KD = T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch
(Hinton, Vinyals & Dean 2015), with ``t`` the teacher's logits and ``s`` the
student's. No true label is used. With a teacher at hand (the default), every epoch's
inputs are augmented (``affine``: each sample its own small rotation, scale and shift;
``shift``: one translation of up to 2 pixels per batch; ``+mix``: then a convex mix with the
reversed batch; ``+cutmix``: a box pasted from it), in the raw range the set is stored in (so that zero fill is
black whatever the normalisation), and the teacher labels what the student sees, a chunk of the epoch in
one bulk pass before its steps; without one, the logits stored in the shards
are the targets and the inputs are used as they are. ``adversarial`` replaces a share of each
batch by views pushed towards the student's disagreement with the teacher (``disagree``),
labelled by the teacher. The student's accuracy on the
real test set is logged (every ``eval_every`` epochs) but never picks the model: the
last epoch's student is the one saved.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import distributed
from .averaging import check_share
from .checkpoint import save_model
from .config import DistillConfig, Runtime, to_dict
from .data import DataInfo, DataSource, at_input, first_batch, info_of
from .errors import DfkdError
from .files import exclusive, weights_sha256
from .loop import accuracy, fit
from .losses import kd_loss
from .models import code_sha256, device_of, predict_logits, train_logits
from .resume import canonical, check_finished, config_settings
from .resume import state_path as state_file
from .runtime import pick_device, seed_everything, setup_threads, whole
from .sources import data_sha256, open_data
from .specs import DataRef, ModelRef, build_student, open_model, require_spec
from .synthetic import SyntheticSet
from .views import AUGMENTS, AUGMENT_FORM, augment, require_images


def disagree(student: nn.Module, teacher: nn.Module, x: torch.Tensor, cfg: DistillConfig,
             info: DataInfo | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Views pushed towards the student's disagreement with the teacher: ``adversarial_steps`` signed
    gradient steps of ``adversarial_step`` (raw units) up ``kd_loss(student(x), teacher(x))``,
    clamped to the data's range; the student in eval mode (its BatchNorm statistics untouched). ``x``
    is raw, and both networks see it through ``info``'s normalisation. Returns the views and the
    teacher's logits for them."""
    was, was_t = student.training, teacher.training
    student, teacher = at_input(student, info), at_input(teacher, info)
    student.eval()
    teacher.eval()
    x = x.detach()
    for _ in range(cfg.adversarial_steps):
        x.requires_grad_(True)
        loss = kd_loss(student(x), teacher(x), cfg.temperature)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x + cfg.adversarial_step * grad.sign()
            if info is not None:
                x = info.clamp(x)
    with torch.no_grad():
        logits = teacher(x).float()  # the teacher's labels for the pushed views, on their device
    student.train(was)
    teacher.train(was_t)
    return x.detach(), logits


def check_views(cfg: DistillConfig, teacher: bool, chosen: bool | None = None,
                shape: tuple[int, ...] | None = None) -> None:
    """Refuse what ``cfg`` asks that could not act, before any step: views ``chosen`` (by default: other than the
    default's, which pass the stored logits and vectors through) that act on images alone, for inputs of ``shape``
    that are not images (``views.require_images``); chosen views without a ``teacher`` to label them; a share
    pushed towards disagreement without one."""
    if cfg.augment not in AUGMENTS:
        raise DfkdError("augment", f"{cfg.augment!r} is not {AUGMENT_FORM}")
    check_share(cfg.average, cfg.epochs)
    chosen = cfg.augment != DistillConfig.augment if chosen is None else chosen
    if chosen and shape is not None:
        require_images(cfg.augment, shape)
    if chosen and not teacher and cfg.augment != "none":
        raise DfkdError("teacher", f"the views {cfg.augment} are labelled by the teacher; give the teacher, or "
                        "--augment none to distill on the stored logits of the inputs as they are")
    if not teacher and cfg.adversarial:
        raise DfkdError("teacher", "the inputs pushed towards disagreement (--adversarial) are labelled by the teacher; "
                        "give the teacher, or leave --adversarial at 0")


def distill(student: nn.Module, synthetic, teacher: nn.Module | None = None, cfg: DistillConfig = DistillConfig(),
            test=None, info: DataInfo | None = None, state_path: Path | None = None, settings: dict | None = None,
            restart: bool = False, rt: Runtime = Runtime()) -> list[dict]:
    """Distill ``student`` on a synthetic set (a ``SyntheticSet``, a folder holding one, or a
    Dataset / ``(x, teacher_logits)`` tensors) of raw inputs: soft targets from ``teacher`` on augmented
    views, or the stored logits without a teacher. Student and teacher see the inputs through ``info``'s
    normalisation (the set's own by default; none for plain tensors without ``info``). ``test`` (a DataSource or test set) is measured every ``eval_every``
    epochs; the last epoch's student is the result. Views other than the default's without a teacher to label
    them, and a share pushed towards disagreement (``adversarial``) without one, are refused (``check_views``);
    image views on inputs that are not images pass them through unchanged, as ``views`` says."""
    whole(rt, "distill")
    if not 0 <= cfg.adversarial <= 1 or cfg.adversarial_steps < 0 or cfg.adversarial_step < 0:
        raise DfkdError("adversarial", f"the share must be in [0, 1] (got {cfg.adversarial}), steps and step size >= 0")
    if isinstance(synthetic, (str, Path)):
        synthetic = SyntheticSet(synthetic).open()
    if isinstance(synthetic, SyntheticSet):
        info = info or synthetic.info
        synthetic = synthetic.dataset()
    info = info or info_of(synthetic)  # a source's split (real-data distillation) brings its own
    check_views(cfg, teacher is not None)
    x0, t0 = first_batch(synthetic)
    with torch.no_grad():
        try:
            probe = at_input(student.eval(), info)(x0.to(device_of(student)))
        except RuntimeError as e:
            raise DfkdError("synthetic", f"inputs of shape {tuple(x0.shape[1:])} do not fit the student: "
                            f"{str(e).splitlines()[0]}") from None
    net_teacher = at_input(teacher, info) if teacher is not None else None  # the teacher on raw inputs
    classes = predict_logits(net_teacher, x0).shape[1] if teacher is not None else t0.shape[-1]
    if probe.shape[1] != classes:
        raise DfkdError("synthetic", f"the teacher has {classes} classes, the student {probe.shape[1]}")
    if isinstance(test, DataSource):
        test = test.test
    test_info = None if info_of(test) is not None else info  # a test set without its own description: info's
    on_epoch = (lambda m: {"test_accuracy": accuracy(at_input(m, test_info), test)}) if test is not None else None  # noqa: E731

    def label(xe, _te, g):  # augment batch by batch (as the steps will see them), label in bulk
        lo, hi = (info.low, info.high) if info is not None else (float(xe.min()), float(xe.max()))  # else the chunk's
        xa = torch.cat([augment(xe[i:i + cfg.batch_size], cfg.augment, g, lo=lo, hi=hi)
                        for i in range(0, len(xe), cfg.batch_size)])
        return xa, predict_logits(net_teacher, xa)

    k = round(cfg.adversarial * cfg.batch_size)

    def batch_loss(m, xb, tb, g):
        if k and teacher is not None:
            xa, ta = disagree(getattr(m, "module", m), teacher, xb[:k], cfg, info)  # not through DDP
            xb, tb = torch.cat([xa, xb[k:]]), torch.cat([ta.to(tb), tb[k:]])
        return kd_loss(train_logits(m, xb, tb.shape[1]), tb, cfg.temperature)
    return fit(student, synthetic, batch_loss, info=info, epochs=cfg.epochs,
               batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, schedule=cfg.schedule, state_path=state_path,
               on_epoch=on_epoch, eval_every=cfg.eval_every, prepare=label if teacher is not None else None,
               desc="distill", progress=rt.progress, settings=dict(settings or {}, config=config_settings(cfg)),
               restart=restart, average=cfg.average)


def distill_file(synthetic: str | Path, student: ModelRef, out: str | Path, cfg: DistillConfig = DistillConfig(),
                 teacher: ModelRef | None = None, data: DataRef = DataRef(), restart: bool = False,
                 rt: Runtime = Runtime(), views_chosen: bool | None = None) -> Path:
    """``dfkd distill``: a student spec trained on a synthetic set (labelled online by the saved
    teacher if given), measured on the real test set of ``data``; saved like a teacher. Views chosen
    (``views_chosen``: the command line says whether ``--augment`` was given; by default, views other than the
    default's) that cannot act on the set's inputs, or without a teacher, are refused (``check_views``). Resumes
    from ``<out>.state.safetensors``; work made with other settings (the set, the teacher, the
    student and its starting weights, the test data, hyperparameters) is refused, or with
    ``restart`` started over; a student made with the same settings is kept (nothing to do)."""
    require_spec(student, "student")
    setup_threads()
    ranks = distributed.group(rt.device)  # under torchrun: data-parallel, each rank a slice of every batch
    seed_everything(cfg.seed)
    synth = SyntheticSet(synthetic).open()
    info = synth.info
    check_views(cfg, teacher is not None, views_chosen, tuple(info.shape))
    dev = pick_device(rt.device)
    tmodel = None
    if teacher is not None:
        tmodel, tdesc, _ = open_model(teacher)
        if tdesc.get("sha256") != synth.manifest.get("teacher_sha256"):
            raise DfkdError(synthetic, "this synthetic set was made from another teacher")
        tmodel.to(dev)
    net = build_student(student.ref, student.args, info)
    code = code_sha256(student.ref)  # None for a registry name
    settings = {"verb": "distill", "synthetic": synth.fingerprint(),
                "teacher_sha256": tdesc.get("sha256") if teacher is not None else None,
                "student": {"spec": student.ref, "args": student.args, "code_sha256": code},
                "start_sha256": weights_sha256(net.state_dict())}
    net.to(dev)
    test = None
    try:  # the set's own data by default (its name is a data spec), when it can still be read
        test = open_data(data.spec or info.name, data.test, info=info).test
    except DfkdError:
        if data.spec is not None:
            raise
    # the test data by content, not by path (a moved copy is the same, a file changed in place is not)
    settings["test"] = [data_sha256(data.spec or info.name), data_sha256(data.test)] if test is not None else None
    with exclusive(Path(out), tag=ranks.tag):
        out = Path(out)
        if check_finished(out, dict(settings, config=config_settings(cfg)), restart):  # made before: kept
            if ranks.main:
                state_file(out).unlink(missing_ok=True)
            ranks.barrier()
            return out.with_name(out.name + ".safetensors")
        history = distill(net, synth, tmodel, cfg, test, info, state_path=state_file(out), settings=settings,
                          restart=restart, rt=rt)
        if not ranks.main:  # rank 0 writes the student
            ranks.barrier()
            return out.with_name(out.name + ".safetensors")
        extra = {"test_accuracy": history[-1]["test_accuracy"]} if "test_accuracy" in history[-1] else {}
        path = save_model(net.cpu(), out, student.ref, student.args, info, history=history, distill_config=to_dict(cfg),
                          objective=synth.manifest.get("objective"), teacher_sha256=synth.manifest.get("teacher_sha256"),
                          synthetic=str(synthetic), synthetic_inputs=len(synth),
                          settings=canonical(dict(settings, config=config_settings(cfg))), **extra)
        state_file(out).unlink(missing_ok=True)
        ranks.barrier()
        return path
