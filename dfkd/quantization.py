"""Post-training static int8 quantization of an exported ONNX file, without data: ONNX Runtime's quantizer
(QDQ format: standard ONNX operators only; int8 weights per output channel, float32 biases, uint8 activations,
as accurate as int8 ones and as fast or faster on this project's CPU, docs/deploy.md) calibrated on raw inputs read from a
dfkd synthetic set shard by shard (``set_inputs``), or on any raw inputs; and the data-free check of what it
cost: agreement with the teacher's labels on synthetic inputs held apart from the calibration (``agreement``).
ONNX Runtime's calibrators keep every calibration batch's activations until the end (its option to fold them
early drops them instead, in 1.32), so memory grows with ``--calibration-inputs`` times the activations.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .data import as_batches
from .errors import DfkdError
from .exporting import compact, set_metadata
from .inference import INPUT, deploy_module, run_onnx, session
from .synthetic import SyntheticSet

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # ONNX Runtime's calibrators
BATCH = 64  # calibration inputs per batch fed to the calibrator


def set_inputs(synthetic: SyntheticSet, start: int, n: int, batch_size: int = BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs ``start .. start + n`` of an opened synthetic set in its own order, as ``(raw inputs, teacher
    labels)`` batches of at most ``batch_size``: shards are read (and verified) one at a time, and only
    those that hold the range."""
    first = 0
    for k, s in enumerate(synthetic.manifest["shards"]):
        lo, hi = max(start, first), min(start + n, first + s["n"])
        first += s["n"]
        if lo >= hi:
            if first >= start + n:
                return
            continue
        t = synthetic.shard(k)
        x, y = t["x"][lo - (first - s["n"]):hi - (first - s["n"])], t["logits"].argmax(1)[lo - (first - s["n"]):hi - (first - s["n"])]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]


class SetInputs:
    """Calibration inputs read from a complete synthetic set in its order (``set_inputs``), its provenance."""

    def __init__(self, synthetic: SyntheticSet):
        self.set = synthetic

    def __len__(self) -> int:
        return len(self.set)

    def batches(self, start: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return set_inputs(self.set, start, n)

    @property
    def about(self) -> dict:
        m = self.set.manifest
        return {"set": self.set.dir.name, "fingerprint": self.set.fingerprint(), "objective": m.get("objective"),
                "teacher_sha256": m.get("teacher_sha256")}


class TensorInputs:
    """Calibration inputs held as tensors (raw inputs ``x``, the teacher's ``labels``: a generator's batch), and
    what they are (``about``)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, about: dict):
        self.x, self.labels, self.about = x, labels, about

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, start: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return as_batches((self.x[start:start + n], self.labels[start:start + n]), BATCH)


class _Reader:
    """ONNX Runtime's calibration reader protocol (``get_next``: one batch's inputs, then None) over raw
    input batches, counting what it gave."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches, self.count = iter(batches), 0

    def get_next(self):
        b = next(self.batches, None)
        if b is None:
            return None
        self.count += len(b)
        return {INPUT: b.float().contiguous().numpy()}


def quantize(fp32: bytes, batches: Iterable[torch.Tensor], method: str = "minmax", per_channel: bool = True) -> tuple[bytes, int]:
    """An exported file's bytes made int8 (QDQ: int8 weights, per output channel where ``per_channel``, and
    uint8 activations whose ranges ``method`` sets from the ``batches`` of raw inputs); returns the file's
    bytes and how many calibration inputs it saw. The metadata entries of ``fp32`` are kept."""
    if method not in METHODS:
        raise DfkdError("calibration_method", f"{method!r} is not one of {', '.join(METHODS)}")
    q, onnx = deploy_module("onnxruntime.quantization"), deploy_module("onnx")
    pre = deploy_module("onnxruntime.quantization.shape_inference")
    with tempfile.TemporaryDirectory(prefix="dfkd-quant-") as d:
        src, prepped, out = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        src.write_bytes(fp32)
        try:  # shape inference and graph optimisation first, as ONNX Runtime advises; the plain file where it fails
            pre.quant_pre_process(str(src), str(prepped))
        except Exception:
            prepped = src
        reader = _Reader(batches)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer's advice goes to the root logger, its calibrators print
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                q.quantize_static(str(prepped), str(out), reader, quant_format=q.QuantFormat.QDQ,
                                  per_channel=per_channel, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8, calibrate_method=getattr(q.CalibrationMethod, METHODS[method]),
                                  extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                                 # biases stay float32: their int32 form needs a scale and a zero
                                                 # point per channel beside it (3x the bytes), which costs a small
                                                 # net its 3.5x
                                                 "QuantizeBias": False})
        except Exception as e:
            raise DfkdError("quantize", f"ONNX Runtime's quantizer failed ({type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
        finally:
            root.setLevel(level)
        model = _notes_dropped(compact(onnx.load(str(out))))
    set_metadata(model, {p.key: p.value for p in onnx.load_from_string(fp32).metadata_props})
    return model.SerializeToString(), reader.count


def _notes_dropped(proto):
    """``proto`` without ONNX Runtime's pre-processing notes (``onnx.*`` metadata). The weights' all-zero zero
    points stay: without them ONNX Runtime 1.32 no longer fuses a Gemm's QDQ into an int8 kernel (Hinton-800's
    file ran 9x slower at batch 1, 6x at batch 64, for 10 bytes less)."""
    notes = [p for p in proto.metadata_props if not p.key.startswith("onnx.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(notes)
    return proto


def agreement(fp32: bytes, int8: bytes, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """Both files on inputs ``x``: each one's agreement with ``labels`` (the teacher's, on synthetic inputs)
    and with each other."""
    try:
        a, b = run_onnx(session(fp32), x).argmax(1), run_onnx(session(int8), x).argmax(1)
    except Exception as e:  # ONNX Runtime refused the quantized file: one line, not a traceback
        raise DfkdError("quantize", f"the int8 file does not run in ONNX Runtime ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    return {"n": len(x), "fp32": round((a == labels).float().mean().item(), 6),
            "int8": round((b == labels).float().mean().item(), 6), "int8_vs_fp32": round((a == b).float().mean().item(), 6)}
