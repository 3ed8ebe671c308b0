"""The privacy accountant of ``dfkd record --privacy`` (``privacy``): Google's ``dp-accounting`` (privacy
loss distributions, the ``dfkd[privacy]`` extra) composes the file's Gaussian events, and ``calibrate``
finds the smallest noise scale whose composition meets ``(epsilon, delta)``. The targets are checked
(``check``) before any pass over the data.
"""
from __future__ import annotations

import math
from functools import lru_cache

from .errors import DfkdError

DEFAULT_DELTA, DEFAULT_DELTA_MAX_N = 1e-6, 100_000  # a fixed default: it says nothing about the data set's size


def _accounting():
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError:
        raise DfkdError("--privacy", "needs the dp-accounting package: pip install 'dfkd[privacy]'") from None
    return dp_accounting, pld_privacy_accountant


def default_delta(n: int) -> float:
    """The fixed default delta, 1e-6: at least 10x below ``1 / n`` up to 100,000 examples. It is not derived
    from ``n`` (a power of ten of the size would tell neighbouring data sets apart at its edges); above that
    size the user must choose (a refusal only the data's owner sees, nothing is released)."""
    if n > DEFAULT_DELTA_MAX_N:
        raise DfkdError("delta", f"the default {DEFAULT_DELTA:g} suits at most {DEFAULT_DELTA_MAX_N:,} training "
                        f"examples and this set has {n:,}: give --delta, at most 1 / (10 x examples) = {0.1 / n:.2g}")
    return DEFAULT_DELTA


def check(epsilon: float, delta: float | None, quantile: float = 0.95) -> None:
    """Refuse bad targets, or a missing accountant, before any pass over the data."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise DfkdError("--privacy", f"epsilon must be a positive finite number, not {epsilon} "
                        "(leave --privacy out for exact statistics)")
    if delta is not None and not 0 < delta < 1:
        raise DfkdError("--delta", f"must lie in (0, 1), not {delta}")
    if not 0 < quantile < 1:
        raise DfkdError("--clip-quantile", f"must lie in (0, 1), not {quantile}")
    _accounting()


def _events(scale: float, groups: tuple[tuple[float, int], ...]):
    dp, _ = _accounting()
    return dp.ComposedDpEvent([dp.SelfComposedDpEvent(dp.GaussianDpEvent(scale / math.sqrt(w)), k)
                               for w, k in groups])


@lru_cache(maxsize=256)
def epsilon_of(scale: float, groups: tuple[tuple[float, int], ...], delta: float, fine: bool = True) -> float:
    """The PLD accountant's epsilon at ``delta`` for events of shares ``groups`` ((share, count) pairs)."""
    _, pld = _accounting()
    acc = pld.PLDAccountant(value_discretization_interval=1e-4 if fine else 1e-3)
    acc.compose(_events(scale, groups))
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=64)
def calibrate(epsilon: float, delta: float, groups: tuple[tuple[float, int], ...]) -> float:
    """The smallest scale ``s`` (events' multipliers ``s / sqrt(share)``) whose composition meets
    ``(epsilon, delta)`` by the accountant (bisection on the coarse grid, checked on the fine one)."""
    lo, hi = 1e-3, 1.0
    while epsilon_of(hi, groups, delta, fine=False) > epsilon:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if epsilon_of(mid, groups, delta, fine=False) > epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-4:
            break
    while epsilon_of(hi, groups, delta) > epsilon:  # the reported (fine) epsilon must meet the target too
        hi *= 1 + 1e-4
    return hi
