"""Flags made from the config dataclasses' fields, and configs made back from the parsed flags: a
field's flag (``config.flag``), value parser (by its type, or its ``parse``), default (the field's
own) and help all come from the field, so a new option is one field. A bool field's flag sets the
opposite of its default (``--no-clamp``, ``--quiet``, ``--restart``)."""
from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import Field, fields
from typing import Any

from .config import flag
from .data import FLOAT32_MAX
from .losses import temperature_problem


def _finite(s: str) -> float:
    """A float flag's value: a finite number (NaN passes every later ``<``/``>`` check, and an infinite
    weight or rate only turns into NaN deep in the work)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a float") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def _positive(kind):
    def parse(s: str):
        if kind is float:
            v = _finite(s)
        else:
            try:
                v = kind(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{s!r} is not a {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{s!r} must be > 0")
        return v
    return parse


def _clip(s: str) -> tuple[str, float]:
    name, eq, bound = s.rpartition("=")
    try:
        v = float(bound)
    except ValueError:
        v = float("nan")
    if not eq or not name or not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"{s!r} is not RECORD=BOUND with a positive bound (e.g. all-layers/fc1=20)")
    return name, v


def _range(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        lo = hi = float("nan")
    if not (lo < hi and hi - lo < float("inf") and max(abs(lo), abs(hi)) <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(f"{s!r} is not LOW,HIGH with LOW < HIGH, both finite in float32 "
                                         f"(|value| <= {FLOAT32_MAX:.4g}; e.g. 0,1)")
    return lo, hi


def _names(s: str) -> tuple[str, ...]:
    """A comma-separated list (``--kinds top-layer,all-layers``)."""
    return tuple(p.strip() for p in s.split(",") if p.strip())


def _temperature(s: str) -> float:
    """A softmax temperature: a finite number in (0, MAX_TEMPERATURE] (``losses.temperature_problem``)."""
    v = _finite(s)
    problem = temperature_problem(v)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return v


PARSERS = {"clip": _clip, "range": _range, "temperature": _temperature}  # a field's ``parse`` beyond ``positive``


def _base(hint: Any) -> tuple[Any, bool]:
    """A type hint without its ``| None``, and whether it had one."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0], len(rest) < len(typing.get_args(hint))
    return hint, False


def _is_list(base: Any) -> bool:
    return typing.get_origin(base) is tuple and typing.get_args(base)[1:] == (Ellipsis,)


def _parse(f: Field, base: Any):
    """The value parser of a field's flag: its ``parse``, else by its type (``int``, a finite ``float``,
    a comma-separated list for ``tuple[str, ...]``, else the string as given)."""
    how = f.metadata.get("parse")
    if how == "positive":
        return _positive(base)
    if how:
        return PARSERS[how]
    if _is_list(base):
        return _names
    return {int: int, float: _finite}.get(base)


class _Given(argparse.Action):
    """Store a flag's value and note its field as typed on the command line (``given``), where its default
    may mean something else than the same value typed (``dfkd distill --augment``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace._given = getattr(namespace, "_given", frozenset()) | {self.dest}


def given(a: argparse.Namespace) -> frozenset:
    """The fields whose flags the command line gave, of those ``add_fields`` made that take a value (a bool's
    or a repeated flag's are not noted)."""
    return getattr(a, "_given", frozenset())


def dest(f: Field) -> str:
    """Where argparse keeps a field's value: the field's name, or for a bool its flag's (``no_clamp``)."""
    return flag(f).lstrip("-").replace("-", "_") if f.type in ("bool", bool) else f.name


def add_fields(p: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (or of the fields named in ``only``); a field whose flag ``p``
    already has (from a parent: ``--seed``, ``--device``, ``--quiet``, ``--restart``) is left to it."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        name = flag(f)
        if name is None or name in p._option_string_actions or (only is not None and f.name not in only):
            continue
        kw = {k: f.metadata[k] for k in ("choices", "metavar") if k in f.metadata}
        if hints[f.name] is bool:
            p.add_argument(name, action="store_true", help=f.metadata["help"], **kw)
            continue
        base, _ = _base(hints[f.name])
        default = f.default
        if _is_list(base) and default is not None:  # shown as typed, parsed like a typed value
            default = ",".join(default)
        if f.metadata.get("repeat"):
            kw.update(action="append", default=[])
        else:
            kw.update(default=default, action=_Given)
        p.add_argument(name, dest=f.name, type=_parse(f, base), help=f.metadata["help"], **kw)


def config_from(a: argparse.Namespace, cls: type, **fixed: Any) -> Any:
    """``cls`` made from the parsed flags of its fields; ``fixed``: fields set by the verb itself."""
    hints = typing.get_type_hints(cls)
    values = dict(fixed)
    for f in fields(cls):
        if f.name in fixed or flag(f) is None:
            continue
        v = getattr(a, dest(f))
        if hints[f.name] is bool:
            v = (not f.default) if v else f.default
        elif f.metadata.get("repeat"):
            v = tuple(v)
        elif _base(hints[f.name])[1] and v == ():  # an empty list where None means "all" or "the default"
            v = None
        values[f.name] = v
    return cls(**values)
