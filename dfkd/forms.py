"""The stored forms of a per-class Gaussian, written and read here only: its ``mean`` and one of
``chol`` (full covariance, as its Cholesky factor), ``std`` (diagonal) or ``factor`` + ``resid_std``
(low rank: ``cov ~ F F^T + diag(r^2)``). ``cov_mode`` turns ``--cov`` into a form; ``shapes`` is a
form's tensor contract, ``write`` its tensors from streamed (``stats.ClassMoments``) or released
(``privacy.Released``) moments; ``std``, ``cov`` and ``draw`` read a stored Gaussian back.
Tensors are named ``<kind>/<part>/<statistic>`` (``key``; no part: ``<kind>/<statistic>``).
"""
from __future__ import annotations

import torch

from .errors import DfkdError
from .stats import cholesky_psd, low_rank


def key(kind: str, stat: str, part: str | None = None) -> str:
    return f"{kind}/{part}/{stat}" if part else f"{kind}/{stat}"


def shapes(mode: str, c: int, d: int) -> dict[str, tuple[int, ...]]:
    """The statistics of a per-class Gaussian of dimension ``d`` stored in covariance ``mode``."""
    out = {"mean": (c, d)}
    if mode == "full":
        out["chol"] = (c, d, d)
    elif mode == "diag":
        out["std"] = (c, d)
    elif mode.startswith("lowrank:"):
        out.update(factor=(c, d, int(mode.split(":")[1])), resid_std=(c, d))
    else:
        raise ValueError(f"unknown covariance mode {mode!r}")
    return out


def cov_mode(spec: str, dim: int) -> str:
    if spec == "auto":
        return "full" if dim <= 256 else "diag"
    if spec in ("full", "diag"):
        return spec
    if spec.startswith("lowrank:") and spec[8:].isdigit() and 0 < int(spec[8:]):
        return f"lowrank:{min(int(spec[8:]), dim)}"
    raise DfkdError("cov", f"{spec!r} is not auto, full, diag or lowrank:K")


def write(kind: str, part: str | None, m, mode: str) -> dict[str, torch.Tensor]:
    """The stored form (``shapes``) of class moments ``m`` (``.mean`` and ``.covariance()``)."""
    t = {"mean": m.mean}
    cov = m.covariance()
    if mode == "full":
        t["chol"] = cholesky_psd(cov)[0]
    elif mode == "diag":
        t["std"] = cov.clamp(min=0).sqrt()
    else:
        t["factor"], resid = low_rank(cov, int(mode.split(":")[1]))
        t["resid_std"] = resid.sqrt()
    return {key(kind, s, part): v for s, v in t.items()}


def std(gauss: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-class standard deviations ``[C, D]`` of a stored Gaussian."""
    if "std" in gauss:
        return gauss["std"]
    if "chol" in gauss:
        return gauss["chol"].pow(2).sum(-1).sqrt()
    return (gauss["factor"].pow(2).sum(-1) + gauss["resid_std"].pow(2)).sqrt()


def cov(gauss: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-class covariances ``[C, D, D]`` of a stored Gaussian, or its variances ``[C, D]`` when diagonal."""
    if "chol" in gauss:
        return gauss["chol"] @ gauss["chol"].transpose(1, 2)
    if "std" in gauss:
        return gauss["std"].pow(2)
    f = gauss["factor"]
    return f @ f.transpose(1, 2) + torch.diag_embed(gauss["resid_std"].pow(2))


def draw(gauss: dict[str, torch.Tensor], labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One draw per label from its class Gaussian, ``mean + L z`` (``z ~ N(0, I)`` from ``g``)."""
    m = gauss["mean"][labels]
    z = torch.randn(m.shape, generator=g)
    if "chol" in gauss:
        return m + torch.einsum("bij,bj->bi", gauss["chol"][labels], z)
    if "std" in gauss:
        return m + gauss["std"][labels] * z
    zk = torch.randn((len(labels), gauss["factor"].shape[-1]), generator=g)
    return m + torch.einsum("bij,bj->bi", gauss["factor"][labels], zk) + gauss["resid_std"][labels] * z
