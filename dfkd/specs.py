"""The command line's two nouns, resolved in one place: a model reference and a data spec.

A model reference is a saved dfkd model (its stem, ``.json`` or ``.safetensors``), a published
folder, a hub reference ``hf:ORG/NAME[@REVISION]`` (downloaded to a local folder with
``huggingface_hub``, the ``dfkd[hub]`` extra; ``HF_HUB_OFFLINE=1`` reads the cache only) or a spec
(``models``: a registry name, ``FILE.py:factory`` or ``module:factory``) with optional weights; a
teacher's statistics file lies beside it (``stats_path``). A data spec is resolved by
``sources.open_data``. A saved model fixes the data's normalisation and shape (as it was trained);
a spec takes them from the data (and ``normalize``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import CARD, CONFIG, STATS, WEIGHTS, is_folder, load_model, load_weights, stats_of
from .data import DataInfo, DataSource
from .errors import DfkdError
from .files import parse_json, weights_sha256
from .models import MODELS, build_model, code_sha256, is_code_spec
from .sources import open_data

HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class ModelRef:
    ref: str                               # saved model, registry name, or path/file.py:factory / module:factory
    weights: str | None = None             # weights for a spec: .safetensors, or a state dict read weights_only
    args: dict = field(default_factory=dict)  # keyword arguments for a spec's factory
    code: tuple[str, ...] = ()             # user code the user names: may be imported for a saved model

    @property
    def is_spec(self) -> bool:
        return self.ref in MODELS or (is_code_spec(self.ref) and not Path(self.ref).exists())


@dataclass(frozen=True)
class DataRef:
    spec: str | None = None                # mnist | idx:DIR | folder:DIR | npz:FILE | cifar10:DIR (None: the model's own)
    test: str | None = None                # another source for the test split
    normalize: str | None = None           # none | auto | MEAN/STD, for data a spec model is trained on


def locate(ref: str) -> str:
    """A model reference with a hub reference (``hf:ORG/NAME[@REVISION]``) made a local folder."""
    if not isinstance(ref, str) or not ref.startswith(HUB_PREFIX):
        return ref
    repo, _, revision = ref[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DfkdError(ref, "a hub reference is hf:ORG/NAME or hf:ORG/NAME@REVISION")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DfkdError(ref, "hub references need huggingface_hub: pip install 'dfkd[hub]'") from None
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=[CONFIG, WEIGHTS, STATS, CARD])
    except Exception as e:  # offline and not cached, unknown repo or revision, network: one line
        what = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise DfkdError(ref, f"cannot get it from the hub{offline}: {type(e).__name__}: {what}") from None


def resolve_model(ref: str, weights: str | None = None, args: dict | None = None, code: tuple[str, ...] = (),
                  info: DataInfo | None = None) -> tuple[nn.Module, dict, DataInfo]:
    """A model as the command line names it: a saved dfkd model (stem or file), or a spec (registry
    name or code) built with ``args`` and, if given, ``weights`` loaded into it."""
    ref = locate(ref)
    if ref in MODELS or (is_code_spec(ref) and not Path(ref).exists()):
        model, info = build_model(ref, info, **(args or {}))
        desc: dict[str, Any] = {"model": {"spec": ref, "args": args or {}, "code_sha256": code_sha256(ref)}}
        if weights:
            state = load_weights(model, weights)
            desc["sha256"] = weights_sha256(state)
        desc["data"] = info.as_dict()
        return model.eval(), desc, info
    if weights or args:
        raise DfkdError("weights", f"{ref} is a saved model: it brings its own weights and arguments")
    return load_model(ref, code)


def stats_path(teacher: str | Path) -> Path:
    """The statistics beside a saved teacher: ``<stem>.stats.safetensors``, or a published folder's."""
    teacher = locate(str(teacher))
    if is_folder(teacher):
        return stats_of(teacher)
    base = Path(teacher)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".stats.safetensors")


def beside(ref: str) -> Path:
    """Where outputs made from a teacher go by default: its folder (a published folder's parent);
    the working folder for a hub reference."""
    if ref.startswith(HUB_PREFIX):
        return Path(".")
    return Path(ref.rstrip("/")).with_suffix("").parent


def parse_args(text: str | None, where: str = "model_args") -> dict:
    if not text:
        return {}
    args = parse_json(text, where)
    if not isinstance(args, dict):
        raise DfkdError(where, "must be a JSON object of keyword arguments, e.g. '{\"width\": 32}'")
    return args


def open_model(m: ModelRef, info: DataInfo | None = None) -> tuple[nn.Module, dict, DataInfo]:
    """The model, its description (spec, arguments, data, weights sha256) and its data description."""
    weights = None if m.weights == RANDOM_WEIGHTS and m.is_spec else m.weights
    return resolve_model(m.ref, weights, m.args, m.code, info)


def open_with_data(m: ModelRef, d: DataRef) -> tuple[nn.Module, dict, DataSource]:
    """A model and the data it takes (raw, described by the model's ``DataInfo``: shape, normalisation)."""
    if m.is_spec:
        data = open_data(d.spec or "mnist", d.test, d.normalize)
        model, desc, info = open_model(m, data.info)
        return model, desc, data.fitted(info.shape)
    model, desc, info = open_model(m)
    if d.normalize not in (None, "none"):
        raise DfkdError("normalize", "a saved model brings the normalisation it was trained with")
    source = open_data(d.spec or info.name, d.test, info=info)
    source.origin["model_normalisation"] = (desc.get("data") or {}).get("normalisation_origin")  # None: unknown
    return model, desc, source


RANDOM_WEIGHTS = "random"  # --weights random: a spec's freshly initialised network, asked for on purpose


def require_weights(m: ModelRef) -> None:
    """Refuse a teacher spec without weights where its statistics are made or read (record,
    reconstruct, leakage, publish): a freshly initialised network's are useless, unless the user
    asks for one with ``weights="random"``."""
    if m.is_spec and m.weights is None:
        raise DfkdError("weights", f"the teacher {m.ref} builds an untrained network, whose statistics would be a "
                        "random network's; give --weights FILE (.safetensors or a state dict), or --weights random "
                        "to use a freshly initialised network on purpose")


def require_spec(m: ModelRef, where: str) -> None:
    """Refuse a reference that is not a spec where a fresh network is built (train, a student)."""
    if not m.is_spec:
        raise DfkdError(where, f"unknown model {m.ref!r}; choose one of {', '.join(MODELS)}, or give code as "
                        "path/to/file.py:factory or package.module:factory")


def build_student(spec: str, args: dict, info: DataInfo) -> nn.Module:
    model, fitted = build_model(spec, info, **args)
    if fitted.shape != info.shape:
        raise DfkdError("student", f"{spec} takes inputs of shape {fitted.shape}, the teacher {info.shape}")
    return model
