"""The teacher's labels in distillation, fp32 against bf16 autocast (``--label-precision``): a whole epoch of
``dfkd.distill`` (views, the teacher's labelling pass, the student's steps) and the labelling pass alone, each
precision in turn, twice (the faster of the two kept), in this process; and what bf16 changes in the labels of the
same views (the mean KL of the softened targets at the recipe's temperature, the largest change of a probability,
the share whose argmax stays).

``python -m benchmarks labels [--teacher SAVED --code FILE --student SPEC [--student-args JSON]] [--data SPEC]
[--synthetic DIR] [--inputs 1310] [--out FILE.json]``. The inputs are a synthetic set's (``--synthetic``), else the
data's training images (the cost does not depend on what the inputs show). Without ``--teacher``, a freshly
initialised own-model pair (``examples/own_model.py``) on the colour digits made at ``--data``'s folder (the
timings hold; the label columns then say little)."""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
import time
from pathlib import Path

import torch

import dfkd
from dfkd.config import LABEL_PRECISIONS, DistillConfig, Runtime
from dfkd.data import as_batches, at_input
from dfkd.distillation import distill, labelling
from dfkd.files import write_json
from dfkd.models import predict_logits
from dfkd.recipes import OWN
from dfkd.runtime import setup_threads
from dfkd.specs import DataRef, ModelRef, build_student, open_with_data
from dfkd.synthetic import SyntheticSet
from dfkd.views import augment

QUIET = Runtime(progress=False)
PRECISIONS = LABEL_PRECISIONS


def _pair(a):
    """The teacher (eval mode), a student and the data: saved ones, else a fresh own-model pair."""
    if a.teacher:
        teacher, _, data = open_with_data(ModelRef(a.teacher, code=(a.code,) if a.code else ()), DataRef(a.data))
        args = json.loads(a.student_args) if a.student_args else {}
        return teacher.eval(), build_student(a.student, args, data.info), data
    data = dfkd.open_data(a.data, normalize="auto")
    torch.manual_seed(0)
    args = {"in_channels": data.info.shape[0]}
    return (build_student("examples/own_model.py:teacher", args, data.info).eval(),
            build_student("examples/own_model.py:student", args, data.info), data)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks labels", description=__doc__.split("\n\n")[1])
    p.add_argument("--teacher", default=None, help="a saved teacher (default: a fresh examples/own_model.py one)")
    p.add_argument("--code", default=None, help="the teacher's and the student's code")
    p.add_argument("--student", default="examples/own_model.py:student", help="the student spec (FILE.py:factory)")
    p.add_argument("--student-args", default=None, help="its keyword arguments, as JSON")
    p.add_argument("--data", default="folder:data/colour-digits")
    p.add_argument("--synthetic", default=None, help="a synthetic set whose inputs to distil on")
    p.add_argument("--inputs", type=int, default=1310, help="inputs in the epoch")
    p.add_argument("--out", default=None, help="write the rows as JSON here too (atomically)")
    a = p.parse_args(argv)
    setup_threads()
    teacher, student, data = _pair(a)
    teacher.requires_grad_(False)
    synth = SyntheticSet(a.synthetic).open() if a.synthetic else None
    info = synth.info if synth else data.info  # a set's inputs through its own description
    x = synth.load()[0][:a.inputs] if synth else next(as_batches(data.train, a.inputs))[0]
    net = at_input(teacher, info)
    logits = predict_logits(net, x)  # the stored logits a set carries; the teacher labels every view anyway
    d = OWN["quick"]
    base = DistillConfig(**dict(d["distill"], **d["optimise_distill"], epochs=1, augment="affine+cutmix"))
    g = torch.Generator().manual_seed(0)
    views = torch.cat([augment(b, base.augment, g, lo=info.low, hi=info.high) for b in x.split(base.batch_size)])
    epoch, label, made = {q: [] for q in PRECISIONS}, {q: [] for q in PRECISIONS}, {}
    for _ in range(2):  # each precision in turn, twice: a machine busy with something else shifts both alike
        for q in PRECISIONS:
            cfg = replace(base, label_precision=q)
            t0 = time.perf_counter()
            distill(copy.deepcopy(student), (x, logits), teacher, cfg, info=info, rt=QUIET)
            t1 = time.perf_counter()
            with labelling(q, net):
                made[q] = predict_logits(net, views)
            t2 = time.perf_counter()
            epoch[q].append(t1 - t0)
            label[q].append(t2 - t1)
    t = base.temperature
    ref = torch.softmax(made["fp32"].double() / t, 1)
    rows = []
    for q in PRECISIONS:
        got = torch.softmax(made[q].double() / t, 1)
        rows.append(dict(precision=q, inputs=len(x), epoch_s=min(epoch[q]), label_s=min(label[q]),
                         epoch_ratio=min(epoch["fp32"]) / min(epoch[q]), label_ratio=min(label["fp32"]) / min(label[q]),
                         kl=(ref * (ref.log() - got.log())).sum(1).mean().item(),
                         max_prob_change=(ref - got).abs().max().item(),
                         argmax_kept=(made[q].argmax(1) == made["fp32"].argmax(1)).double().mean().item()))
    print(f"| labels | inputs | epoch s | vs fp32 | labelling pass s | vs fp32 | KL at T={t:g} vs fp32 | largest "
          "probability change | argmax kept |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['inputs']} | {r['epoch_s']:.2f} | {r['epoch_ratio']:.2f}x | {r['label_s']:.2f} | "
              f"{r['label_ratio']:.2f}x | {r['kl']:.2e} | {r['max_prob_change']:.2e} | {100 * r['argmax_kept']:.2f}% |")
    print(f"(torch {torch.__version__}, {torch.get_num_threads()} threads; the faster of two runs each)")
    if a.out:
        write_json(Path(a.out), rows)
    return rows
