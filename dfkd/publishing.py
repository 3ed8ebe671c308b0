"""The distribution format: one folder that carries a model and what compressing it needs.

``publish`` writes, atomically (built beside it, then renamed into place)::

    <folder>/model.safetensors   the weights
    <folder>/config.json         how to rebuild the model and what it takes (docs/format.md)
    <folder>/stats.safetensors   the statistics, bound to the weights by their sha256
    <folder>/README.md           a model card: kinds, sizes, what they reveal, the recipe

The folder is read as a plain directory, a git checkout or a model-hub snapshot: every verb
takes it where it takes a teacher (``specs`` resolves the reference, ``hf:ORG/NAME[@REVISION]``
among them: downloaded with ``huggingface_hub``, the ``dfkd[hub]`` extra).
Code is never part of it: a model made from user code records its import spec and sha256.
"""
from __future__ import annotations

import json
import os
import shutil
from itertools import product
from pathlib import Path

from safetensors.torch import save as st_save

from .checkpoint import CARD, CONFIG, FOLDER_FORMAT, FOLDER_VERSION, STATS, WEIGHTS, read_config, read_model_desc
from .config import DistillConfig, ReconstructConfig, default, flag_of, to_dict
from .errors import DfkdError
from .exporting import DEPLOY
from .files import read_json, sweep_temps, weights_sha256, write_json
from .kinds import REGISTRY, entry_kind
from .metadata import load, summary
from .models import spec_name
from .privacy_report import clip_warnings, not_private
from .profiles import configs, matches_records, pairs
from .recipes import OWN, PAIRS, PROFILES
from .run_config import RunConfig
from .sources import SOURCES
from .specs import open_model, stats_path
from .version import __version__


def publish(teacher, stats: str | os.PathLike | None, out: str | os.PathLike, student: str | None = None,
            name: str | None = None, repo: str | None = None) -> Path:
    """``dfkd publish``: a saved teacher (``ModelRef``) and its statistics file as a folder at
    ``out`` (which must not exist yet). ``student``: a student distilled from it (a saved model
    stem), whose accuracy and recipe the card states; ``repo``: the hub name the card's commands use."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DfkdError(out, "already exists; publish to a new folder (or delete this one)")
    model, desc, info = open_model(teacher)
    sha = weights_sha256(model.state_dict())  # what binds the statistics to these weights
    meta = load(stats or stats_path(teacher.ref), sha)
    config = {"format": FOLDER_FORMAT, "version": FOLDER_VERSION, "library": "dfkd", "dfkd_version": __version__,
              "model": desc["model"], "data": info.as_dict(), "sha256": sha,
              # the hub conventions (timm, open_clip), derived from the above for other tools
              "architecture": desc["model"]["spec"], "num_classes": info.num_classes,
              "label_names": list(info.class_names or []),
              "pretrained_cfg": {"input_size": list(info.shape), "mean": list(info.mean), "std": list(info.std)}}
    recipe = _recipe(student) if student else None
    if recipe:
        config["recipe"] = recipe
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / WEIGHTS).write_bytes(st_save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}))
        shutil.copyfile(meta.path, tmp / STATS)
        write_json(tmp / CONFIG, config)
        (tmp / CARD).write_text(model_card(config, meta, name or out.name, repo, recipe))
        sweep_temps(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError as e:
        raise DfkdError(out, f"cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    read_config(out)
    return out


def _recipe(student: str) -> dict:
    """What made a distilled student: its accuracy, and the reconstruction and distillation settings."""
    desc_path, _, desc = read_model_desc(student)
    out = {"student": desc["model"], "student_accuracy": desc.get("test_accuracy"),
           "objective": desc.get("objective"), "distill": desc.get("distill_config")}
    if desc.get("synthesis") == "generator":  # distilled online from a generator: its three configs
        out["generator"] = {k: desc.get(k) for k in ("reconstruct_config", "distill_config", "generator_config")}
    synthetic = desc.get("synthetic")
    if synthetic and (Path(synthetic) / "manifest.json").is_file():
        out["reconstruct"] = read_json(Path(synthetic) / "manifest.json").get("config")
    if out["distill"] is None or out["objective"] is None:
        raise DfkdError(desc_path, "not a distilled student (no distillation settings in it)")
    shipped = desc_path.with_name(desc_path.stem + DEPLOY)  # dfkd run --export's file, measured where it was made
    try:
        figures = read_json(shipped) if shipped.is_file() else {}
    except DfkdError:  # damaged: the card goes without it
        figures = {}
    if figures.get("student_sha256") == desc.get("sha256"):  # of these very weights
        out["deploy"] = figures
    return out


# The settings the card's commands spell, per verb in the command line's order, by their library
# names; each field's flag is its own (``config.flag``: ``clamp`` False -> ``--no-clamp``, a flag that
# takes no value). A value equal to the config's default is left out. tests/test_publish.py checks
# each against the command line's parser.
CARD_FLAGS = {
    "reconstruct": (ReconstructConfig, ("objective", "n", "batch_size", "steps", "lr", "init", "init_mean", "init_std",
                                        "clamp", "jitter", "views", "unit_targets", "tv", "l2", "patch_tv", "patch",
                                        "bn_weight", "ce", "whiten", "basis")),
    "distill": (DistillConfig, ("augment", "temperature", "epochs", "batch_size", "lr", "schedule", "adversarial",
                                "adversarial_steps", "adversarial_step", "eval_every", "average")),
}


def card_command(verb: str, values: dict, fixed: list[str]) -> str:
    """A ``dfkd VERB`` command line giving ``values`` (library names) that differ from the defaults,
    spelt with their fields' flags (``CARD_FLAGS``, ``config.flag``)."""
    cls, names = CARD_FLAGS[verb]
    parts = ["dfkd", verb, *fixed]
    for name in names:
        flag = flag_of(cls, name)
        if flag.startswith("--no-"):
            if name in values and values[name] is False:
                parts.append(flag)
        elif name in values and values[name] is not None and values[name] != default(cls, name) \
                and not isinstance(values[name], bool):
            parts += [flag, str(values[name])]
    if values.get("seed"):
        parts += ["--seed", str(values["seed"])]
    return " ".join(parts)


def model_card(config: dict, meta, name: str, repo: str | None, recipe: dict | None) -> str:
    """The folder's README.md: front matter for the hubs, then what the folder holds, the kinds and
    their sizes, what they reveal, and the recipe with the commands that reproduce it."""
    data, model = config["data"], config["model"]
    ref = f"hf:{repo}" if repo else f"path/to/{name}"
    code = f" --code {Path(model['spec'].rpartition(':')[0]).name}" if model.get("code_sha256") else ""
    s = summary(meta)
    rec = meta.header["recorded_on"]
    lines = ["---", "library_name: dfkd", "tags:", "- dfkd", "- data-free-knowledge-distillation",
             "- knowledge-distillation", "- image-classification", "---", "", f"# {name}", "",
             f"A `{model['spec']}` classifier for inputs of shape {tuple(data['shape'])} and {data['num_classes']} "
             f"classes, published with dfkd {config['dfkd_version']} together with the activation statistics that "
             "let anyone compress it into a smaller network without its training data (Lopes, Fenu & Starner, "
             "*Data-Free Knowledge Distillation for Deep Neural Networks*, 2017).", "",
             "| file | what it holds |", "|---|---|",
             f"| `{WEIGHTS}` | the weights (sha256 of the tensors `{config['sha256'][:16]}...`) |",
             f"| `{CONFIG}` | how to rebuild the model (`{model['spec']}`, arguments `{model.get('args') or {}}`), its "
             f"inputs (shape, normalisation mean {data['mean']} and std {data['std']}, range {data['low']:g}.."
             f"{data['high']:g}) and class names |",
             f"| `{STATS}` | statistics recorded on {rec['dataset']} ({rec['n_samples']:,} examples), bound to these "
             f"weights by their sha256 |", ""]
    if model.get("code_sha256"):
        lines += [f"The model is built by user code, `{model['spec']}` (sha256 `{model['code_sha256'][:16]}...`), "
                  "which this folder does not contain: dfkd imports it only when you name it with `--code`.", ""]
    lines += ["## Statistics", "", "| kind | what it holds | floats | bytes |", "|---|---|---|---|"]
    lines += [f"| {k} | {REGISTRY[k].reveals if k in REGISTRY else 'the class counts'} | {v['floats']:,} | "
              f"{v['bytes']:,} |" for k, v in s["per_kind"].items()]
    lines += ["", "## What the statistics reveal", ""]
    reveals = meta.header.get("closed_form")
    exact = [r for r in reveals or [] if isinstance(r, dict) and r.get("class_means") == "exact"]
    if exact:
        by = " and ".join(f"the {entry_kind(meta.kinds, r)} record of {r['layer']}" for r in exact)  # whose means give them
        lines.append(f"{by[0].upper()}{by[1:]} {'gives' if len(exact) == 1 else 'each give'} each class's mean "
                     "training input exactly (the layer is affine in the input); dfkd leakage shows it.")
    elif isinstance(reveals, list):
        lines.append("No class mean of the training inputs follows from these statistics in closed form "
                     "(dfkd leakage measures it).")
    else:
        lines.append("Not measured: run `dfkd leakage` against the training data.")
    priv = meta.header.get("privacy")
    if not_private(priv):
        lines += [f"**The statistics are NOT private**: {not_private(priv)}.", "", "## Compress it", ""]
    elif priv:
        lines += [f"The statistics' tensors and counts are ({priv.get('target_epsilon', priv['epsilon']):g}, "
                  f"{priv['delta']:.3g})-differentially private "
                  f"({priv['neighbouring']}; {priv['mechanism']} noise on clipped contributions, accounted by "
                  f"{priv['accountant']} {priv['accountant_version']}): adding or removing any one training example "
                  "changes the odds of anything computed from them by at most that bound. Class means, averages "
                  "over many examples, still show through. Not covered: the weights, and everything in "
                  f"`{CONFIG}` (the model's normalisation and range are part of the model, public by the "
                  "publisher's choice; if they were computed on the training data, e.g. by `dfkd train --normalize "
                  "auto` or from a float npz set's observed range, they are exact). In the statistics' header these "
                  "values are public, not protected (`dfkd inspect` lists them, every clip bound and noise scale):",
                  ""] + [f"- {k}: {v}" for k, v in (priv.get("public") or {}).items()]
        warned = clip_warnings(priv)
        lines += ([""] + ["Reported when the statistics were recorded (judged on released values only):", ""]
                  + [f"- {w}" for w in warned] if warned else []) + ["", "## Compress it", ""]
    else:
        lines += ["The statistics were recorded without differential privacy: they add an exact summary of the "
                  "training data to what the weights themselves reveal.", "", "## Compress it", ""]
    if recipe:
        rc, dc = dict(recipe.get("reconstruct") or {}), dict(recipe["distill"])
        rc.setdefault("objective", recipe["objective"])
        student = dict(recipe["student"])
        student["spec"] = spec_name(student["spec"])  # the user's copy of the code, by its name
        sargs = f" --student-args '{json.dumps(student['args'])}'" if student.get("args") else ""
        acc = recipe.get("student_accuracy")
        lines += [f"The recipe below gave a `{student['spec']}` student "
                  + (f"**{100 * acc:.2f}%** test accuracy against the true labels." if acc is not None else ".")]
        e = recipe.get("deploy")
        if isinstance(e, dict) and {"file", "quantize", "accuracy", "bytes", "fp32_bytes", "b1_ms"} <= set(e):
            lines += ["", f"Exported by `dfkd run --export {'int8' if e['quantize'] == 'int8' else 'fp32'}` beside the "
                      f"student as `{e['file']}` ({'int8' if e['quantize'] == 'int8' else 'float32'} ONNX, takes raw "
                      "inputs; not in this folder: `dfkd export` makes it from the student): "
                      f"**{100 * e['accuracy']:.2f}%** test accuracy through ONNX Runtime, {e['bytes'] / 1e3:,.1f} kB"
                      + (f" ({e['fp32_bytes'] / e['bytes']:.2f}x smaller than float32)" if e["quantize"] == "int8" else "")
                      + f", {e['b1_ms']:.3f} ms per input at batch 1 on the CPU that made it"
                      + (f" ({e['threads']} thread(s))." if e.get("threads") else ".")]
        if recipe.get("generator"):
            lines += _generator_lines(recipe, ref + code, student["spec"], sargs, str(data.get("name") or ""))
        else:
            lines += ["", "```bash", "# dfkd with its hub extra: pip install '.[hub]' in a dfkd checkout",
                      card_command("reconstruct", rc, ["--teacher", ref + code, "--out", "synthetic"]),
                      card_command("distill", dc, ["--synthetic", "synthetic", "--teacher", ref + code, "--student",
                                                   student["spec"] + sargs, "--out", "student"]), "```", ""]
    else:
        lines += ["```bash", "# dfkd with its hub extra: pip install '.[hub]' in a dfkd checkout",
                  f"dfkd reconstruct --teacher {ref}{code} --objective {_suggested(meta.kinds)} --out synthetic",
                  f"dfkd distill --synthetic synthetic --teacher {ref}{code} --student YOUR_STUDENT --out student",
                  "```", ""]
    return "\n".join(lines)


def run_flags(objective: str, saved: dict, student: str) -> list[str] | None:
    """The ``dfkd run`` flags (beside ``--teacher``, ``--data`` and the student's arguments) that make a generator
    student's saved configs again (``saved``: its ``reconstruct_config``, ``distill_config`` and
    ``generator_config``): a registry student's network (``--networks``) or ``--student``, the profile, the
    objective, iterations, seen views, unit targets, temperature, distillation views and the students' lr (each
    where not the profile's) and seed; None where no profile of this version makes them."""
    rc, dc, gc = (saved.get(k) for k in ("reconstruct_config", "distill_config", "generator_config"))
    if not all(isinstance(c, dict) for c in (rc, dc, gc)):
        return None
    chosen = dict(objectives=(objective,), synthesis="generator", iterations=gc.get("iterations"),
                  seen_views=rc.get("views", default(ReconstructConfig, "views")),
                  unit_targets=rc.get("unit_targets", default(ReconstructConfig, "unit_targets")) if matches_records(objective) else None,
                  temperature=None if dc.get("temperature") == default(DistillConfig, "temperature") else dc.get("temperature"),
                  seed=gc.get("seed", 0))
    nets = [n for n, s in PAIRS.items() if s == student]
    tries = ([(p, {"networks": (nets[0],)}) for p in PROFILES] if nets else []) + [(p, {"student": student}) for p in OWN]
    for (profile, who), augment, lr in product(tries, (None, dc.get("augment")), (None, dc.get("lr"))):
        cfg = RunConfig(teacher="teacher", profile=profile, **who, **chosen, augment=augment, lr=lr)  # a saved teacher
        try:
            made = [to_dict(c) for c in configs(objective, pairs(cfg)[0], cfg.seed, cfg)]
        except (DfkdError, TypeError, ValueError):  # settings this profile does not take
            continue
        if made == [rc, dc, gc]:
            given = dict(who, profile=profile, **chosen, augment=augment, lr=lr)
            given = {k: v for k, v in given.items() if v is not None and (k not in ("profile", "seed") or
                                                                         v != default(RunConfig, k))}
            return [a for k, v in given.items()
                    for a in (flag_of(RunConfig, k), ",".join(v) if isinstance(v, tuple) else str(v))] + \
                [flag_of(RunConfig, "baselines")]
    return None


def _generator_lines(recipe: dict, teacher: str, student: str, sargs: str, data: str) -> list[str]:
    """A generator student's recipe: the ``dfkd run`` line that trains the generator and distils the student
    again (``run_flags``; ``data``: the kind of data spec the teacher was trained on), or its settings
    where no run profile of this version makes them."""
    flags = run_flags(recipe["objective"], recipe["generator"], student)
    lines = ["", "It was distilled online from a generator trained against this model and its statistics "
             f"(`--synthesis generator`, objective `{recipe['objective']}`)."]
    if flags is None:
        return lines + ["No `dfkd run` profile of this version makes its settings; they were:", "", "```json",
                        json.dumps(recipe["generator"], indent=1, sort_keys=True), "```", ""]
    kind = data.partition(":")[0] if ":" in data else data
    where = "FILE" if kind == "npz" else "DIR"
    spec = kind if kind == "mnist" else f"{kind}:{where}" if kind in SOURCES else "SPEC"
    said = "" if kind == "mnist" else f"{where}: labelled data of these classes, as `{kind}:` reads it; " \
        if kind in SOURCES else "SPEC: labelled data of these classes (mnist, idx:DIR, folder:DIR, npz:FILE or cifar10:DIR); "
    return lines + ["", "```bash", "# dfkd with its hub extra: pip install '.[hub]' in a dfkd checkout; " + said
                    + "the student is measured on its test split, nothing is trained on it",
                    " ".join(["dfkd run --teacher", teacher, *flags, *([sargs.strip()] if "--student" in flags and sargs
                                                                      else []), "--data", spec, "--out student"]),
                    "```", ""]


def _suggested(kinds: list[str]) -> str:
    """The objective a card suggests for a file of ``kinds``: its last kind's (token-positions, kept beside a
    pooled record, aside unless alone), norm-stats joined to all-layers."""
    kinds = [k for k in kinds if k != "token-positions"] or kinds
    return "all-layers+norm-stats" if kinds[-1] == "norm-stats" and "all-layers" in kinds else kinds[-1]
