"""``dfkd export``: a saved model as an ONNX file (``exporting``), made int8 on a dfkd synthetic set where asked
(``quantization``), with the calibration's provenance and the data-free check's figures in its metadata; the
calibration inputs themselves written for a user's own runtime (``--calibration-npz``)."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .config import ExportConfig
from .data import DataInfo
from .errors import DfkdError
from .exporting import MIN_OPSET, as_json, set_metadata, to_onnx, write
from .inference import deploy_module
from .files import atomic_write
from .models import spec_name
from .quantization import SetInputs, TensorInputs, agreement, quantize
from .sources import open_data
from .specs import DataRef, ModelRef, open_model
from .synthetic import SyntheticSet

Calibration = SetInputs | TensorInputs


def open_calibration(path: str | Path, info: DataInfo) -> SetInputs:
    """The inputs of a complete synthetic set whose raw inputs fit the model's (shape and range)."""
    if Path(path).is_file():
        raise DfkdError(path, "is a file: give the synthetic set's folder (the one holding manifest.json)")
    s = SyntheticSet(path).open()
    si = s.info
    if tuple(si.shape) != tuple(info.shape):
        raise DfkdError(path, f"holds inputs of shape {tuple(si.shape)}; the model takes {tuple(info.shape)}")
    if si.num_classes != info.num_classes:
        raise DfkdError(path, f"was made for {si.num_classes} classes; the model gives {info.num_classes}")
    if (si.low, si.high) != (info.low, info.high):
        raise DfkdError(path, f"holds inputs in {si.low:g}..{si.high:g}; the model takes {info.low:g}..{info.high:g}")
    return SetInputs(s)


def _writable(folder: Path) -> bool:
    """Whether files can be made in ``folder``, or in the nearest folder above it that exists (made on write)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def source_of(desc: dict) -> dict:
    """What an exported file says it was made from: the model's spec (``models.spec_name``: no path of this
    machine is shipped) and its weights' sha256."""
    return {"spec": spec_name(str((desc.get("model") or {}).get("spec"))), "weights_sha256": desc.get("sha256")}


def npz_bytes(batches) -> tuple[bytes, int]:
    """The calibration inputs as an ``.npz``'s bytes: ``x`` (raw float32, ``[N, *shape]``, as the exported file
    takes them) and ``teacher_label``; and N."""
    xs, ys = zip(*batches)
    buf = io.BytesIO()
    np.savez(buf, x=torch.cat(xs).float().numpy(), teacher_label=torch.cat(ys).numpy())
    return buf.getvalue(), sum(len(x) for x in xs)


def export_model(model: torch.nn.Module, info: DataInfo, cfg: ExportConfig = ExportConfig(), calibration: Calibration | None = None,
                 source: dict | None = None) -> tuple[bytes, dict]:
    """``model`` as an ONNX file's bytes, int8 where ``cfg.quantize`` says (calibrated on the first
    ``cfg.calibration_inputs`` inputs of ``calibration``, checked on the next ``cfg.check_inputs``), and
    what was done: sizes, the PyTorch match, the check's figures."""
    newest = deploy_module("onnx").defs.onnx_opset_version()
    if not MIN_OPSET <= cfg.opset <= newest:
        raise DfkdError("opset", f"{cfg.opset} is " + (f"older than the exporter writes ({MIN_OPSET} or newer)"
                        if cfg.opset < MIN_OPSET else "newer than the installed onnx knows (its newest: python -c 'import onnx; "
                        "print(onnx.defs.onnx_opset_version())')"))
    if cfg.quantize not in ("none", "int8"):
        raise DfkdError("quantize", f"{cfg.quantize!r} is not none or int8")
    meta = {"source": source or {}}
    if cfg.quantize == "int8" and calibration is None:
        raise DfkdError("calibration", "int8 needs calibration inputs: give a synthetic set (dfkd reconstruct makes one)")
    fp32, diff = to_onnx(model, info, meta, cfg.opset)
    report = {"fp32_bytes": len(fp32), "onnx_vs_pytorch": diff, "quantize": cfg.quantize}
    if cfg.quantize == "none":
        return fp32, report
    n = min(cfg.calibration_inputs, len(calibration))
    int8, seen = quantize(fp32, (x for x, _ in calibration.batches(0, n)), cfg.calibration_method, cfg.per_channel)
    held = min(cfg.check_inputs, len(calibration) - n)
    xs, ys = zip(*calibration.batches(n, held)) if held else zip(*calibration.batches(0, min(n, cfg.check_inputs)))
    check = agreement(fp32, int8, torch.cat(xs), torch.cat(ys))
    check["inputs"] = "held apart" if held else "the calibration inputs (none left to hold apart)"
    prov = {"format": "QDQ", "weights": "int8 per output channel" if cfg.per_channel else "int8 per tensor", "biases": "float32",
            "activations": "uint8 (asymmetric)", "method": cfg.calibration_method, "tool": "onnxruntime",
            "calibration": dict(calibration.about, inputs=seen),
            "check": check}
    proto = deploy_module("onnx").load_from_string(int8)
    set_metadata(proto, {"quantization": as_json(prov)})
    int8 = proto.SerializeToString()
    report.update(int8_bytes=len(int8), calibration_inputs=seen, check=check, method=cfg.calibration_method)
    return int8, report


def drop_beyond(check: dict | None, max_drop: float) -> float | None:
    """The points of agreement int8 loses against float32 on the checked inputs (``check``'s ``fp32`` and ``int8``
    shares) where that is more than ``max_drop`` points, else None (no check, or a drop within it)."""
    if not check:
        return None
    drop = 100 * (check["fp32"] - check["int8"])
    return drop if drop > max_drop else None


def warn_drop(path: str | Path, check: dict | None, max_drop: float) -> None:
    """The one warning line on stderr of ``dfkd export`` and ``dfkd run --export`` where int8 loses more than
    ``max_drop`` points of agreement on the checked inputs (``drop_beyond``)."""
    drop = drop_beyond(check, max_drop)
    if drop is not None:
        print(f"dfkd: warning: {path}: int8 agrees with the teacher's labels on {100 * check['int8']:.2f}% of "
              f"{check['n']} synthetic inputs ({check['inputs']}), float32 on {100 * check['fp32']:.2f}%: a drop of "
              f"{drop:.2f} points, more than --max-drop {max_drop:g}", file=sys.stderr)


def export_file(model: ModelRef, out: str | Path, cfg: ExportConfig = ExportConfig(), calibration: str | None = None,
                calibration_npz: str | None = None, data: DataRef = DataRef()) -> tuple[Path, dict]:
    """``dfkd export``: a saved model (or a spec with weights: its input shape and normalisation from ``data``)
    to ``out`` (``.onnx``); the report of
    ``export_model``, with a warning on stderr where int8 loses more than ``cfg.max_drop`` points of
    agreement with the teacher on the checked synthetic inputs."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise DfkdError("out", f"{out} must end in .onnx")
    if calibration_npz and not calibration:
        raise DfkdError("calibration_npz", "writes the calibration inputs: give --calibration too")
    if calibration and cfg.quantize == "none" and not calibration_npz:
        raise DfkdError("calibration", "is read only with --quantize int8 or --calibration-npz")
    if model.is_spec and not model.weights:
        raise DfkdError("weights", f"{model.ref} builds an untrained network: give its trained weights with --weights "
                        "FILE, or export a saved model")
    if not model.is_spec and (data.spec or data.normalize not in (None, "none")):
        raise DfkdError("data" if data.spec else "normalize", "a saved model brings the input shape and normalisation "
                        "it was trained with (--data and --normalize are for a model given as a spec)")
    if calibration_npz:
        npz_path = Path(calibration_npz).resolve()
        if npz_path.suffix != ".npz":
            raise DfkdError("calibration_npz", f"{calibration_npz} must end in .npz")
        if npz_path.is_relative_to(Path(calibration).resolve()):
            raise DfkdError("calibration_npz", "lies inside the synthetic set it reads: give a path outside it")
    for flag, dest in (("out", out), ("calibration_npz", calibration_npz)):  # refused now, not after the work
        if dest and (Path(dest).is_dir() or not _writable(Path(dest).resolve().parent)):
            raise DfkdError(flag, f"{dest}: cannot write " + ("(a folder stands there)" if Path(dest).is_dir()
                                                              else "(its folder is not writable)"))
    net, desc, info = open_model(model, open_data(data.spec or "mnist", None, data.normalize).info) if model.is_spec \
        else open_model(model)
    cal = open_calibration(calibration, info) if calibration else None
    raw, report = export_model(net, info, cfg, cal, source_of(desc))
    npz = npz_bytes(cal.batches(0, min(cfg.calibration_inputs, len(cal)))) if calibration_npz else None
    if npz is not None:  # the calibration inputs first: the model file then never stands without them
        atomic_write(calibration_npz, npz[0])
        report["npz_inputs"] = npz[1]
    try:
        write(out, raw)
    except BaseException:
        if npz is not None:
            Path(calibration_npz).unlink(missing_ok=True)
        raise
    report["bytes"] = len(raw)
    warn_drop(out, report.get("check"), cfg.max_drop)
    return out, report
