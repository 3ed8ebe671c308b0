"""Export: a network as one ONNX file that takes raw inputs (its normalisation folded in), with its
class names, input range and provenance in the file's metadata, checked against PyTorch by ONNX
Runtime before it is written. ``quantization`` makes the int8 file from it; ``export_file`` is
``dfkd export``. Needs the ``dfkd[deploy]`` extra (onnx, onnxscript, onnxruntime), imported on use:
dfkd itself runs without it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import ExportConfig, default
from .data import DataInfo, at_input
from .errors import DfkdError
from .files import atomic_write
from .inference import INPUT, OUTPUT, deploy_module, example_inputs, run_onnx, session
from .version import __version__

OPSET = default(ExportConfig, "opset")  # 20: GELU one node (opset 18 spells it in five, each quantized apart)
MIN_OPSET = 18  # the exporter's lowest
FORMAT = "dfkd-onnx"
DEPLOY = ".deploy.json"  # beside a student dfkd run exported: what its file scored (``shipping``)
MATCH = 1e-4  # the largest |logit difference| between ONNX Runtime and PyTorch an export may show


def _exported(net: nn.Module, info: DataInfo, opset: int):
    """The dynamo exporter's program for ``net`` (raw in, logits out, any batch size), its logs and warnings
    kept quiet; ``None`` and the exception where it fails."""
    deploy_module("onnxscript")
    batch = torch.export.Dim("batch", min=1, max=2 ** 20)
    try:
        with _quiet():
            prog = torch.onnx.export(net, (example_inputs(info, 2),), dynamo=True, input_names=[INPUT],
                                     output_names=[OUTPUT], dynamic_shapes=({0: batch},), opset_version=opset,
                                     verbose=False, optimize=True)
        return prog, None
    except Exception as e:
        return None, e


def _why(e: BaseException) -> str:
    """What the exporter could not do, in a few words: the operator it has no ONNX translation for where it
    names one, else its innermost error's first line."""
    op = re.search(r"op='([\w.]+)'", str(e))
    if op:
        return f"the operator {op.group(1)} has no ONNX translation"
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _quiet():
    """The exporter's loggers held at ERROR and its warnings ignored, for a ``with`` block."""
    stack = contextlib.ExitStack()
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        lg = logging.getLogger(name)
        stack.callback(lg.setLevel, lg.level)
        lg.setLevel(logging.ERROR)
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _culprit(net: nn.Module, x: torch.Tensor, opset: int) -> str | None:
    """The innermost module of ``net`` that does not export on its own (its inputs from one forward pass),
    found by descending from the top into the first child that fails; None where the failure is no module's."""
    seen: dict[str, tuple] = {}

    def keep(path: str):
        def hook(mod, args, kwargs, out) -> None:  # a hook that returned a value would replace the output
            seen.setdefault(path, (args, kwargs))
        return hook
    hooks = [m.register_forward_hook(keep(p), with_kwargs=True) for p, m in net.named_modules() if p]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    mods, path = dict(net.named_modules()), ""
    while True:
        kids = [p for p in seen if p.startswith(f"{path}." if path else "") and "." not in p[len(path) + bool(path):]]
        bad = None
        for p in kids:
            args, kwargs = seen[p]
            if not args or not all(torch.is_tensor(a) for a in args):
                continue
            try:
                with _quiet():
                    torch.onnx.export(mods[p], tuple(args), kwargs=dict(kwargs), dynamo=True, opset_version=opset,
                                      verbose=False)
            except TypeError:  # called in a way the exporter does not take on its own: not judged
                continue
            except Exception:
                bad = p
                break
        if bad is None:
            return path or None
        path = bad


def _exporter_works(opset: int) -> str | None:
    """Why the exporter fails on a plain Linear layer (the installed torch / onnxscript, not the model), or None."""
    try:
        with _quiet():
            torch.onnx.export(nn.Linear(2, 2), (torch.zeros(1, 2),), dynamo=True, opset_version=opset, verbose=False)
    except Exception as e:
        return _why(e)
    return None


def to_onnx(model: nn.Module, info: DataInfo, metadata: dict | None = None, opset: int = OPSET,
            check_inputs: torch.Tensor | None = None) -> tuple[bytes, float]:
    """``model`` (taking normalised inputs, as dfkd trains it; put in eval mode on the CPU) as the bytes of an
    ONNX file that takes raw inputs ``[N, *info.shape]`` in ``info``'s range and gives logits; ``metadata``
    (JSON-able values) goes into the file's metadata beside the input's description and class names. Checked
    before it is returned: ONNX Runtime's logits on ``check_inputs`` (default: 64 inputs spread over the
    range) against PyTorch's, within ``MATCH`` times the largest logit (at least 1), the largest difference
    returned; a model ONNX cannot express is refused naming its module."""
    net = at_input(model, info).eval().cpu()
    prog, err = _exported(net, info, opset)
    if prog is None:
        broken = _exporter_works(opset)
        if broken:
            raise DfkdError("export", f"the ONNX exporter does not run here ({broken}); dfkd export needs torch 2.6 "
                            "or newer with onnxscript: pip install 'dfkd[deploy]'")
        where = _culprit(model.eval().cpu(), info.to_model(example_inputs(info, 2)), opset)
        what = f"its module {where} ({type(model.get_submodule(where)).__name__})" if where else "the network"
        raise DfkdError("model", f"cannot be exported to ONNX: {what} uses what ONNX cannot express ({_why(err)})")
    wrote = {o.version for o in prog.model_proto.opset_import if o.domain in ("", "ai.onnx")}
    if wrote != {opset}:
        raise DfkdError("opset", f"the exporter wrote opset {', '.join(map(str, sorted(wrote)))}, not {opset}")
    batch = prog.model_proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value"):  # traced with its batch size fixed: a file for batches of that size only
        raise DfkdError("model", "cannot be exported with a free batch size: its code fixes the batch dimension while "
                        "traced (as len(x) or int(x.shape[0]) do; x.shape[0] or x.size(0) keep it free)")
    x = check_inputs if check_inputs is not None else example_inputs(info, 64, seed=1)
    with torch.no_grad():
        want = net(x.float())
    proto = compact(prog.model_proto)
    proto.producer_name, proto.producer_version = "dfkd", __version__
    props = dict(describe_input(info, want.shape[1]),
                 **{k: v if isinstance(v, str) else as_json(v) for k, v in (metadata or {}).items()})
    set_metadata(proto, props)
    raw = proto.SerializeToString()
    try:
        diff = (run_onnx(session(raw), x) - want).abs().max().item()
    except Exception as e:  # ONNX Runtime refused the file or its inputs: a gap between exporter and runtime
        raise DfkdError("model", f"its ONNX export does not run in ONNX Runtime ({_why(e)}); not written") from None
    limit = MATCH * max(1.0, want.abs().max().item())
    if not diff <= limit:
        raise DfkdError("model", f"its ONNX export differs from PyTorch by {diff:.3g} in the logits (more than "
                        f"{limit:.3g}, {MATCH:g} of the largest logit); not written")
    return raw, diff


def _named(spec: str) -> str:
    """A data spec as the file may carry it: its kind and its folder's or file's name, never the path."""
    kind, colon, where = spec.partition(":")
    return f"{kind}:{Path(where).name}" if colon and where else spec


def describe_input(info: DataInfo, outputs: int | None = None) -> dict[str, str]:
    """The metadata that says what the file takes and gives: raw inputs, normalisation folded in."""
    names = list(info.class_names) if info.class_names else [str(c) for c in range(info.num_classes)]
    return {"dfkd.format": FORMAT, "dfkd.version": __version__,
            "input": as_json({"name": INPUT, "shape": ["batch", *info.shape], "dtype": "float32",
                                 "raw_range": [info.low, info.high], "data": _named(info.name),
                                 "normalisation": {"folded_in": True, "mean": list(info.mean), "std": list(info.std)}}),
            "output": as_json({"name": OUTPUT, "shape": ["batch", outputs or info.num_classes], "meaning": "logits"}),
            "class_names": as_json(names)}


def _strip(nodes) -> bool:
    """Node names, doc strings and the exporter's metadata cleared, in subgraphs too; whether there were any."""
    nested = False
    for n in nodes:
        n.name = n.doc_string = ""
        del n.metadata_props[:]
        for a in n.attribute:
            for g in ([a.g] if a.type == a.GRAPH else list(a.graphs) if a.type == a.GRAPHS else []):
                nested = True
                g.doc_string = ""
                _strip(g.node)
    return nested


def compact(proto):
    """``proto`` without what a runtime does not read: intermediate shapes, node names, doc strings and the
    exporter's per-node metadata (its stack traces name this machine's files), every value but the graph's
    input and output renamed to a short name. Returns it."""
    del proto.graph.value_info[:]
    proto.doc_string = proto.graph.doc_string = ""
    nested = _strip(proto.graph.node)
    for f in proto.functions:
        f.doc_string = ""
        nested |= _strip(f.node) or True
    if nested:
        return proto  # subgraphs (If, Loop) or functions refer to outer names: those are kept as they are
    keep, names = {v.name for v in (*proto.graph.input, *proto.graph.output)}, {}

    def short(name: str) -> str:
        return name if not name or name in keep else names.setdefault(name, format(len(names), "x"))
    for t in proto.graph.initializer:
        t.name = short(t.name)
    for n in proto.graph.node:
        n.input[:] = [short(v) for v in n.input]
        n.output[:] = [short(v) for v in n.output]
    return proto


def as_json(value) -> str:
    """A metadata entry's JSON, without spaces (a small network's file counts its bytes)."""
    return json.dumps(value, separators=(",", ":"))


def set_metadata(proto, props: dict[str, str]) -> None:
    """Set (replace) string metadata entries of an ONNX model."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for k, v in keep + sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def read_metadata(path: str | Path | bytes) -> dict[str, str]:
    """An ONNX file's metadata entries (a path, or the file's bytes)."""
    onnx = deploy_module("onnx")
    try:
        proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise DfkdError(path, f"not a readable ONNX file ({_why(e)})") from None
    return {p.key: p.value for p in proto.metadata_props}


def write(path: str | Path, raw: bytes) -> Path:
    """The file, written atomically (a reader sees the old file or the new one)."""
    return atomic_write(Path(path), raw)
