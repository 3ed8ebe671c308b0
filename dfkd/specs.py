"""The command line's two nouns, resolved in one place: a model reference and a data spec.

A model reference is a saved dfkd model (its stem, ``.json`` or ``.safetensors``) or a spec
(``models``) with optional weights; a data spec is resolved by ``data.open_data``. A saved
model fixes the data's normalisation and shape (as it was trained); a spec takes them from
the data (and ``normalize``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .checkpoint import parse_json, resolve_model
from .data import DataInfo, DataSource, open_data
from .errors import DfkdError
from .models import MODELS, build_model, is_code_spec


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
    spec: str | None = None                # mnist | idx:DIR | folder:DIR | npz:FILE (None: the model's own)
    test: str | None = None                # another source for the test split
    normalize: str | None = None           # none | auto | MEAN/STD, for data a spec model is trained on


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
    """A model and the data it takes, in its input space."""
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
