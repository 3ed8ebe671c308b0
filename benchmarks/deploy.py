"""``python -m benchmarks deploy MODEL=SYNTHETIC_DIR ... [--code FILE.py] [--json FILE] [--choice]``

Per saved model, in one run: the ONNX file at float32 and at int8 calibrated three ways (on the synthetic
set's first inputs, on as many real training inputs, on uniform noise over the input range), each one's
true-label accuracy on the real test set (ONNX Runtime), file size, and latency (median ms per batch) and
throughput (inputs/s) at batch 1 and 64 on this CPU, with PyTorch eager beside them. The real-calibrated
line is the upper one, the noise line the lower: what the synthetic set buys lies between."""
from __future__ import annotations

import argparse
import time

import torch

from dfkd.config import ExportConfig
from dfkd.data import as_batches
from dfkd.deployment import export_model, open_calibration, source_of
from dfkd.inference import accuracy, example_inputs, session, speeds
from dfkd.loop import predictions
from dfkd.quantization import TensorInputs
from dfkd.specs import DataRef, ModelRef, open_with_data

from .common import dump

BATCHES = (1, 64)


def _eager(net, info, b: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(info.to_model(b))


def measure(ref: str, synthetic: str, code: tuple[str, ...] = (), n: int = 1024, threads: int = 2) -> list[dict]:
    """One model's lines: every file made by ``dfkd export``'s own code (``export_model``), so that sizes are the
    shipped files', metadata included."""
    torch.set_num_threads(threads)
    net, desc, source = open_with_data(ModelRef(ref, code=code), DataRef())
    info, made = source.info, source_of(desc)  # the file's provenance, as dfkd export writes it
    g = torch.Generator().manual_seed(0)
    x_real, y_real = next(as_batches(source.train, n, torch.randperm(len(source.train), generator=g)[:n]))
    noise = example_inputs(info, n, seed=7)
    with torch.no_grad():
        own = net(info.to_model(noise)).argmax(1)  # the check's labels for noise: the network's own
    cfg = ExportConfig(quantize="int8", calibration_inputs=n, check_inputs=1)
    files = {"float32": export_model(net, info, ExportConfig(), None, made)[0]}
    for name, cal in (("int8 real-calibrated", TensorInputs(x_real, y_real, {"real": "training inputs"})),
                      ("int8 synthetic-calibrated", open_calibration(synthetic, info)),
                      ("int8 noise-calibrated", TensorInputs(noise, own, {"noise": "uniform over the range"}))):
        files[name] = export_model(net, info, cfg, cal, made)[0]
    rows = [dict(model=ref, what="PyTorch eager float32", accuracy=_eager_accuracy(net, source), bytes=None,
                 **speeds(lambda b: _eager(net, info, b), info, BATCHES, 2.0))]
    for name, raw in files.items():
        sess = session(raw, threads)
        rows.append(dict(model=ref, what=f"ONNX Runtime {name}", accuracy=accuracy(sess, source.test), bytes=len(raw),
                         **speeds(lambda b, s=sess: s.run(None, {"input": b.numpy()}), info, BATCHES, 2.0)))
    return rows


def _eager_accuracy(net, source) -> float:
    with torch.no_grad():
        pred, y = predictions(net, source.test)
    return (pred == y).float().mean().item()


def table(rows: list[dict]) -> str:
    """The figures as Markdown: per model, PyTorch eager and each file, accuracy and its difference to the float32
    file's, size and how much smaller, latency at batch 1 and throughput at batch 64."""
    out = ["| model | file | test accuracy % | vs float32 | size kB | smaller | ms, batch 1 | inputs/s, batch 1 | "
           "ms, batch 64 | inputs/s, batch 64 |", "|---|---|---|---|---|---|---|---|---|---|"]
    fp32 = {r["model"]: r for r in rows if r["what"] == "ONNX Runtime float32"}
    for r in rows:
        f = fp32[r["model"]]
        quant = "int8" in r["what"]
        size = f"{r['bytes'] / 1e3:,.1f}" if r["bytes"] else ""
        out.append(f"| {r['model']} | {r['what']} | {100 * r['accuracy']:.2f} | "
                   + (f"{100 * (r['accuracy'] - f['accuracy']):+.2f}" if quant else "") + f" | {size} | "
                   + (f"{f['bytes'] / r['bytes']:.2f}x" if quant else "") + f" | {r['b1_ms']:.3f} | {r['b1_per_s']:,.0f} | "
                   f"{r['b64_ms']:.2f} | {r['b64_per_s']:,.0f} |")
    return "\n".join(out)


def choice(ref: str, synthetic: str, code: tuple[str, ...] = (), n: int = 1024, threads: int = 2) -> list[dict]:
    """ONNX Runtime's quantizer options side by side on one model: QDQ or QOperator, int8 or uint8 activations
    (per-channel int8 weights, float32 biases, MinMax on the synthetic set's first ``n`` inputs), each file's
    test accuracy, size and latency; what ``dfkd.quantization`` chose from."""
    torch.set_num_threads(threads)
    net, _, source = open_with_data(ModelRef(ref, code=code), DataRef())
    info = source.info
    fp32 = export_model(net, info, ExportConfig())[0]
    xs = [x for x, _ in open_calibration(synthetic, info).batches(0, n)]
    rows = []
    for fmt, act in [("float32", "")] + [(f, a) for f in ("QDQ", "QOperator") for a in ("QInt8", "QUInt8")]:
        raw = fp32 if fmt == "float32" else _quantized(fp32, xs, fmt, act)
        sess = session(raw, threads)
        rows.append(dict(model=ref, format=fmt, activations={"QInt8": "int8", "QUInt8": "uint8"}.get(act, ""),
                         accuracy=accuracy(sess, source.test), bytes=len(raw),
                         **speeds(lambda b, s=sess: s.run(None, {"input": b.numpy()}), info, BATCHES, 1.5)))
    return rows


def _quantized(fp32: bytes, xs: list, fmt: str, act: str) -> bytes:
    import contextlib
    import io
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from dfkd.exporting import compact
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.onnx").write_bytes(fp32)
        quant_pre_process(str(Path(d) / "a.onnx"), str(Path(d) / "p.onnx"))
        it = iter(xs)

        class Reader:  # ONNX Runtime's calibration reader protocol
            def get_next(self):
                b = next(it, None)
                return None if b is None else {"input": b.numpy()}
        reader = Reader()
        with contextlib.redirect_stdout(io.StringIO()):
            q.quantize_static(str(Path(d) / "p.onnx"), str(Path(d) / "b.onnx"), reader,
                              quant_format=getattr(q.QuantFormat, fmt), per_channel=True,
                              activation_type=getattr(q.QuantType, act), weight_type=q.QuantType.QInt8,
                              extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": False})
        return compact(onnx.load(str(Path(d) / "b.onnx"))).SerializeToString()


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks deploy", description=__doc__.split("\n\n")[1])
    p.add_argument("pairs", nargs="+", metavar="MODEL=SYNTHETIC_DIR")
    p.add_argument("--code", action="append", default=[], help="user code the saved models were made from")
    p.add_argument("--inputs", type=int, default=1024, help="calibration inputs per line (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--json", default="runs/deploy.json", help="(default: %(default)s)")
    p.add_argument("--choice", action="store_true", help="compare ONNX Runtime's quantizer options instead")
    a = p.parse_args(argv)
    rows, t0 = [], time.perf_counter()
    if a.choice:
        for pair in a.pairs:
            ref, _, syn = pair.partition("=")
            rows += choice(ref, syn, tuple(a.code), a.inputs, a.threads)
        print("| model | format | activations | test accuracy % | size kB | ms, batch 1 | ms, batch 64 |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['format']} | {r['activations']} | {100 * r['accuracy']:.2f} | {r['bytes'] / 1e3:,.1f} | "
                  f"{r['b1_ms']:.3f} | {r['b64_ms']:.2f} |")
        dump(a.json, {"threads": a.threads, "inputs": a.inputs, "rows": rows, "seconds": time.perf_counter() - t0})
        return
    for pair in a.pairs:
        ref, _, syn = pair.partition("=")
        rows += measure(ref, syn, tuple(a.code), a.inputs, a.threads)
        print(f"  {ref} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table(rows))
    dump(a.json, {"threads": a.threads, "inputs": a.inputs, "rows": rows, "seconds": time.perf_counter() - t0})
