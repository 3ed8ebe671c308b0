"""What each verb of the command line does with its parsed flags: build the config from them
(``cli_fields.config_from``), call the one library function the verb maps to, print what it made. ``COMMANDS`` maps a verb to its function."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .cli_fields import config_from, given
from .config import DistillConfig, ExportConfig, ReconstructConfig, RecordConfig, Runtime, TrainConfig
from .deployment import export_file
from .distillation import distill_file
from .evaluation import evaluate_file
from .files import read_json
from .leakage import holds, leakage_file
from .kinds import REGISTRY, entry_kind, means_kind, means_kinds
from .metadata import load, summary
from .pipeline import run
from .privacy_report import clip_warnings, describe
from .objectives import known, needs
from .publishing import publish
from .reconstruction import reconstruct_file
from .recording import record_file
from .run_config import RunConfig
from .specs import DataRef, ModelRef, beside, parse_args, require_weights, stats_path
from .training import train_file


def _list(s: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in s.split(",") if p.strip()) if s else ()


def _code(a) -> tuple[str, ...]:
    """The user code the user allows dfkd to import (``--code``, repeatable, comma-separated)."""
    return tuple(c for x in a.code for c in _list(x))


def _model(a, flag: str = "teacher", weights: bool = True):
    """The model a flag names; ``weights``: a teacher whose statistics are made or read, which a spec
    gives only with ``--weights``."""
    ref = getattr(a, flag)
    m = ModelRef(ref, getattr(a, "weights", None) if weights else None,
                 parse_args(getattr(a, f"{flag}_args", None)), _code(a))
    if weights:
        require_weights(m)
    return m


def runtime_of(a) -> Runtime:
    """How the verb runs: ``--device`` (picked by ``cli.main``), ``--quiet``, and for reconstruct ``--rank``
    and ``--world-size``."""
    return config_from(a, Runtime, **{k: getattr(a, k, None) for k in ("rank", "world_size")})


def _data_ref(a):
    return DataRef(a.data, a.test_data, getattr(a, "normalize", None))


def _cmd_train(a) -> int:
    cfg = config_from(a, TrainConfig)
    path = train_file(_model(a, "model", weights=False), _data_ref(a), Path(a.out) / a.name, cfg, a.restart, runtime_of(a))
    desc = read_json(path.with_name(path.name.replace(".safetensors", ".json")))
    acc = f" (test accuracy {100 * desc['test_accuracy']:.2f}%)" if "test_accuracy" in desc else ""
    _say(f"saved {path}{acc}")
    return 0


def _cmd_record(a) -> int:
    path, meta = record_file(_model(a), _data_ref(a), a.out, config_from(a, RecordConfig), runtime_of(a))
    t = meta.timings
    if t:  # the process that recorded (rank 0 under torchrun)
        print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB; pass {t['pass_seconds']:.1f}s,"
              f" spectral bases {t['basis_seconds']:.1f}s)")
        _print_reveals(meta.header)
        p = meta.header.get("privacy")
        if p:
            print(f"privacy: ({p['target_epsilon']:g}, {p['delta']:.3g})-differential privacy (the accountant's "
                  f"epsilon: {p['epsilon']:.6g}); dfkd inspect lists every clip bound and noise scale")
            for w in clip_warnings(p):  # judged on released (noisy) quantities only
                print(f"dfkd: warning: {w}", file=sys.stderr)
    return 0


def _print_reveals(h: dict) -> None:
    if h.get("privacy"):  # the closed form then gives the class means plus the calibrated noise only
        return
    kinds = h.get("kinds") or ()
    for r in h.get("closed_form") or []:
        if isinstance(r, dict) and r.get("class_means") == "exact":
            kind = entry_kind(kinds, r)
            every = kind if kind == "token-positions" else " and ".join(means_kinds(kinds)) or "all-layers"
            print(f"note: its {kind} record of {r['layer']} gives each class's mean training input exactly "
                  f"({'and its covariance ' if r.get('cov') == 'full' else ''}in closed form; see dfkd leakage). "
                  f"To ship less: --layers without {r['layer']}, or --kinds without {every}")


def _forms(layer: dict, kinds) -> str:
    """A layer's stored forms: ``cov=`` (the header's ``layers[].cov``: the all-layers record's form) where
    all-layers (or no kind of the layers' class means) is in the file, and every other such kind's by name."""
    own = means_kinds(kinds)
    out = [f"cov={layer['cov']}"] if "all-layers" in kinds or not own else []
    return " ".join(out + [f"{k}={REGISTRY[k].form(layer)}" for k in own if k != "all-layers"])


def _cmd_inspect(a) -> int:
    meta = load(a.file)
    s, h = summary(meta), meta.header
    d = h["data"]
    print(f"{a.file}: {h['format']} v{h['version']}, teacher {h.get('teacher', '?')} (sha256 {h['teacher_sha256'][:12]}...)")
    print(f"kinds: {', '.join(h['kinds'])}; {h['num_classes']} classes"
          + (f" ({', '.join(d['class_names'][:10])}{'...' if len(d['class_names']) > 10 else ''})" if d.get("class_names") else "")
          + f"; recorded on {h['recorded_on']['dataset']} ({h['recorded_on']['n_samples']} samples)")
    print(f"inputs: {tuple(d['shape'])}, raw range {d['low']:g}..{d['high']:g}, normalised with mean {d['mean']} std {d['std']}")
    print("layers: " + ", ".join(f"{l['path']} {tuple(l['shape'])} per {l['stat']} {_forms(l, h['kinds'])}"
                                 for l in h["layers"]))
    print("\n".join(describe(h)))
    if h.get("norms"):
        print("norm layers (norm-stats: their inputs per feature): " +
              ", ".join(f"{n['path']} ({n['type']}, {n['features']} features)" for n in h["norms"]))
    print("\n".join(holds(meta)))  # what each kind and each layer holds, as dfkd leakage says it
    print(f"{'kind':<16}{'record':<36}{'floats':>12}{'bytes':>14}")
    for r in s["rows"]:
        print(f"{r['kind']:<16}{r['record']:<36}{r['floats']:>12,}{r['bytes']:>14,}")
    for k, v in s["per_kind"].items():
        ratio = f" ({100 * v['bytes'] / s['train_bytes']:.3f}% of the training inputs)" if s["train_bytes"] else ""
        print(f"total {k:<14}{v['floats']:>12,} floats {v['bytes']:>14,} bytes{ratio}")
    ratio = f"; the training inputs are {s['train_bytes']:,} bytes: {s['train_bytes'] / s['total_bytes']:.1f}x larger" \
        if s["train_bytes"] else ""
    print(f"total {s['total_floats']:,} floats, {s['total_bytes']:,} bytes{ratio}")
    _print_reveals(h)
    return 0


def _cmd_reconstruct(a) -> int:
    cfg = config_from(a, ReconstructConfig)
    needs_stats = not known(a.objective) or bool(needs(a.objective))  # an unknown name: make_objective says so
    stats = a.stats or (str(stats_path(a.teacher)) if needs_stats else None)
    out = a.out or str(beside(a.teacher) / "synthetic" / a.objective)
    path = reconstruct_file(_model(a), stats, out, cfg, a.allow_other_teacher, a.restart, runtime_of(a))
    if read_json(path).get("complete"):
        _say(f"wrote {a.n} inputs for {a.objective} to {path.parent} (manifest {path.name})")
    else:
        print(f"wrote this rank's shards to {path.parent}; the set is complete when every rank has finished")
    return 0


def _cmd_publish(a) -> int:
    path = publish(_model(a), a.stats, a.out, a.student, a.name, a.repo)
    print(f"published {path}: {', '.join(sorted(p.name for p in path.iterdir()))}")
    return 0


def _say(line: str) -> None:
    """Print once per job: on rank 0 of a torchrun job (or the only process)."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


def _cmd_distill(a) -> int:
    cfg = config_from(a, DistillConfig)
    teacher = _model(a, weights=False) if a.teacher else None
    path = distill_file(a.synthetic, _model(a, "student", weights=False), a.out, cfg, teacher, _data_ref(a),
                        a.restart, runtime_of(a), views_chosen="augment" in given(a))
    desc = read_json(path.with_name(path.name.replace(".safetensors", ".json")))
    acc = f" (student test accuracy {100 * desc['test_accuracy']:.2f}%)" if "test_accuracy" in desc else ""
    _say(f"saved {path}{acc}")
    return 0


def _cmd_evaluate(a) -> int:
    teacher = _model(a, weights=False) if a.teacher else None
    res = evaluate_file(ModelRef(a.model, code=_model(a, weights=False).code), _data_ref(a), teacher, a.device)
    line = f"{a.model}: test accuracy {100 * res['accuracy']:.2f}% on {res['n']} inputs"
    if "agreement" in res:
        line += (f"; teacher {100 * res['teacher_accuracy']:.2f}%, share {100 * res['share_of_teacher']:.1f}%,"
                 f" agreement {100 * res['agreement']:.2f}%")
    print(line)
    if a.json:
        print(json.dumps(res, indent=2))
    return 0


def _cmd_leakage(a) -> int:
    out = a.out or str(beside(a.teacher) / (Path(a.teacher.rstrip("/")).with_suffix("").name + ".leakage"))
    path, rep = leakage_file(_model(a), a.stats, _data_ref(a), out, tuple(a.synthetic))
    print(f"{rep['stats']} holds:\n" + "\n".join(f"  {line}" for line in rep["holds"]))
    print(f"{rep['stats']} ({', '.join(rep['kinds'])}) against the true class means of the training data:")
    if not rep["inversions"]:
        print(f"  no {means_kind(rep['kinds']) or 'all-layers'} record is affine in the input: no class mean follows "
              "in closed form")
    for r in rep["inversions"]:
        how = "exactly" if r["exact"] else f"in a {r['rank']}-dimensional projection"
        print(f"  {r['layer']} (per {r['stat']}, cov {r['cov']}): class-mean inputs recovered in closed form {how} "
              f"(rank {r['rank']} of {r['input_dim']}): R^2 {r['r2']:.3f}, RMSE {r['rmse']:.4f}")
    for name, r in rep["synthetic"].items():
        near = f"; nearest training / test input {r['nearest']['ratio']:.3f}" if "nearest" in r else ""
        print(f"  synthetic {name}: class means R^2 {r['r2']:.3f}, RMSE {r['rmse']:.4f}{near}")
    png = path.with_suffix(".png")
    print(f"report: {path}" + (f", picture: {png}" if png.is_file() else ""))
    return 0


def _cmd_export(a) -> int:
    model = ModelRef(a.model, a.weights, parse_args(a.model_args), _code(a))
    path, r = export_file(model, a.out, config_from(a, ExportConfig), a.calibration, a.calibration_npz, _data_ref(a))
    kb = f"{r['bytes'] / 1e3:,.1f} kB"
    if r["quantize"] == "int8":
        c = r["check"]
        print(f"wrote {path} (int8, {kb}; float32 {r['fp32_bytes'] / 1e3:,.1f} kB: {r['fp32_bytes'] / r['bytes']:.2f}x "
              f"smaller), calibrated on {r['calibration_inputs']} inputs of {a.calibration} ({r['method']})")
        print(f"check on {c['n']} synthetic inputs ({c['inputs']}): agreement with the teacher's labels int8 "
              f"{100 * c['int8']:.2f}%, float32 {100 * c['fp32']:.2f}%; int8 agrees with float32 on {100 * c['int8_vs_fp32']:.2f}%")
    else:
        print(f"wrote {path} (float32, {kb}); ONNX Runtime matches PyTorch within {r['onnx_vs_pytorch']:.2g}")
    if a.calibration_npz:
        print(f"wrote {a.calibration_npz} ({r['npz_inputs']} calibration inputs)")
    return 0


def _cmd_run(a) -> int:
    path = run(config_from(a, RunConfig, code=_code(a)))
    if os.environ.get("RANK", "0") == "0":  # the rank that wrote them
        _say((path.parent / "results.md").read_text())
        _say(f"results: {path} and {path.parent / 'results.md'}")
    return 0


# verb -> what it does (``cli_parser`` makes one sub-parser per verb)
COMMANDS = {"train": _cmd_train, "record": _cmd_record, "reconstruct": _cmd_reconstruct, "distill": _cmd_distill,
            "evaluate": _cmd_evaluate, "run": _cmd_run, "leakage": _cmd_leakage, "publish": _cmd_publish,
            "inspect": _cmd_inspect, "export": _cmd_export}
