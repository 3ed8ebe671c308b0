"""``dfkd run --export``: each data-free student ends as an ONNX file beside it (``<student>.onnx``, or
``<student>.int8.onnx`` calibrated on the inputs it was distilled from: its synthetic set's, or a batch its
generator makes), measured where it was made: true-label accuracy on the real test split through ONNX
Runtime, size, and latency at batch 1 and 64 on this machine (``<student>.deploy.json``, read by the report
and the model card)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .config import ExportConfig
from .data import at_input
from .deployment import export_model, open_calibration, source_of, warn_drop
from .errors import DfkdError
from .exporting import DEPLOY, write
from .inference import INPUT, accuracy, session, speeds
from .files import read_json, write_json
from .generation import load_generator
from .quantization import TensorInputs
from .run_config import RunConfig


def _generated(stem: Path, teacher: nn.Module, info, n: int, seed: int) -> TensorInputs:
    """``n`` inputs of the student's saved generator (classes in turn, latents from ``seed``) and the teacher's
    labels for them."""
    path = stem.with_name(stem.name + ".generator.safetensors")
    gen, _ = load_generator(path)
    y = torch.arange(n) % gen.classes
    z = torch.randn(n, gen.latent, generator=torch.Generator().manual_seed(seed))
    dev, net = next(teacher.parameters()).device, at_input(teacher, info)
    with torch.no_grad():
        x = torch.cat([gen(z[i:i + 256], y[i:i + 256]) for i in range(0, n, 256)])
        labels = torch.cat([net(x[i:i + 256].to(dev)).argmax(1).cpu() for i in range(0, n, 256)])
    return TensorInputs(x, labels, {"generator": path.name, "seed": seed})


FIGURES = ("file", "quantize", "bytes", "fp32_bytes", "sha256", "student_sha256", "accuracy", "b1_ms", "b64_per_s")


def kept_figures(figures: Path, path: Path, source: dict, quantize: str) -> dict | None:
    """The figures of a file an earlier run exported from these very weights in this mode, where the file is
    still the one measured (its sha256); else None (export it again)."""
    try:
        done = read_json(figures)
        same = set(FIGURES) <= set(done) and done["file"] == path.name and done["quantize"] == quantize and \
            done["student_sha256"] == source["weights_sha256"] and path.is_file() and \
            hashlib.sha256(path.read_bytes()).hexdigest() == done["sha256"]
    except (DfkdError, OSError):
        return None
    return done if same else None


def ship(stem: Path, student: nn.Module, teacher: nn.Module, data, cfg: RunConfig, synthetic: Path, seed: int) -> dict:
    """Export a saved student as ``cfg.export`` says, measure the file, and write what it scored beside it
    (the other mode's file, if an earlier run made one, removed); a file an earlier run made from the same
    weights in the same mode is kept with its figures, unless ``cfg.restart``."""
    ec = ExportConfig(quantize="int8" if cfg.export == "int8" else "none")
    source = source_of(read_json(stem.with_suffix(".json")))
    path, other = (stem.with_name(stem.name + s) for s in ((".int8.onnx", ".onnx") if ec.quantize == "int8"
                                                            else (".onnx", ".int8.onnx")))
    done = None if cfg.restart else kept_figures(stem.with_name(stem.name + DEPLOY), path, source, ec.quantize)
    if done is not None:  # this student's file, exported and measured by an earlier run of the same settings
        return done
    cal = None
    if ec.quantize == "int8":
        cal = open_calibration(synthetic, data.info) if cfg.synthesis == "optimise" else \
            _generated(stem, teacher, data.info, ec.calibration_inputs + ec.check_inputs, seed)
    raw, rep = export_model(student.cpu().eval(), data.info, ec, cal, source)
    write(path, raw)
    other.unlink(missing_ok=True)
    threads = torch.get_num_threads()
    sess = session(raw, threads)
    out = {"file": path.name, "quantize": ec.quantize, "bytes": len(raw), "fp32_bytes": rep["fp32_bytes"],
           "sha256": hashlib.sha256(raw).hexdigest(), "student_sha256": source["weights_sha256"],
           "accuracy": accuracy(sess, data.test), "check": rep.get("check"), "threads": threads,
           **speeds(lambda b: sess.run(None, {INPUT: b.numpy()}), data.info, (1, 64), 0.5)}
    write_json(stem.with_name(stem.name + DEPLOY), out)
    warn_drop(path, out["check"], ec.max_drop)
    return out
