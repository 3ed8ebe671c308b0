"""An empirical audit of ``dfkd record --privacy``'s noise: a lower bound on epsilon from canaries
(Jagielski, Ullman & Oprea 2020; Nasr et al. 2021), run through the real clipping and noise code.

The audited file has one record whose bound is given, so its events are the class counts, the
record's sums and its second moments. ``classes`` classes hold two ordinary examples each; half of
them also hold a canary, an example far beyond the clip bound ``C`` in one coordinate, which clipping
leaves at exactly ``C``: the largest contribution one example can make (``C`` to a sum, ``C^2`` to a
second moment). Each round clips the examples (``ClippedMoments``) and releases them with fresh noise
(``Budget.noisy_counts``, ``Budget.release``); class ``k``'s statistic is
``T_k = (S_k - S0_k) / C + (Q_k - Q0_k) / C^2``, with ``S0, Q0`` the canary-free sums in closed form.
The sum and the second moment carry equal multipliers ``z``, so ``T`` is ``N(0, 2 z^2)`` without the
canary and ``N(2, 2 z^2)`` with it, and a threshold on ``T`` is the likelihood-ratio (Neyman-Pearson)
test; each term alone is thresholded too, so that a wrong sensitivity or multiplier on one release
shows. Every class is an independent trial: the noise is independent per entry.

At thresholds fixed in advance (``J`` of them), one-sided Clopper-Pearson bounds at confidence
``1 - alpha / (2 J)`` bound every error rate from above, all together with probability at least
``1 - alpha``. An (epsilon, delta)-DP mechanism has ``FPR e^epsilon + FNR >= 1 - delta`` (and with the
roles swapped), so ``epsilon_lb = log((1 - delta - FNR_up) / FPR_up)``, the largest over thresholds,
exceeds the true epsilon with probability at most ``alpha``: correctly calibrated code passes
(``epsilon_lb <= claimed``) with probability at least ``1 - alpha``. ``design`` tunes one threshold per
statistic to each alternative "every noise multiplier divided by ``f``" (``FACTORS``) and computes, from
the binomial laws of the error counts under it, the bound the audit reaches there with probability at
least ``1 - alpha``; when that bound exceeds the claimed epsilon, such under-noising fails the audit
with at least that probability.

That audit is against the overall epsilon; ``release_audit`` (below) audits each release kind (count, clip
histogram, sum, diagonal second moment, full covariance) against its own share of the budget.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .accountant import calibrate
from .privacy import Budget, CELLS, ClippedMoments, LOG2_LOW, LOG2_STEP, SHARES, histogram

ALPHA = 1e-6  # the audit's error probability, each way
FACTORS = (2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 64.0)  # the under-noising (multipliers divided by) thresholds are tuned to


def _scipy():
    from scipy.stats import beta, binom, norm  # scipy comes with the privacy extra (dp-accounting)
    return beta, binom, norm


def gdp_mu(epsilon: float, delta: float) -> float:
    """The Gaussian-DP ``mu`` whose (epsilon, delta) curve passes through the claim (Dong, Roth & Su 2019),
    by bisection on the closed form (independent of dp-accounting)."""
    _, _, norm = _scipy()
    lo, hi = 1e-6, 100.0
    for _ in range(200):
        mu = (lo + hi) / 2
        d = norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)
        lo, hi = (lo, mu) if d > delta else (mu, hi)
    return lo


def cp_upper(k, n: int, a: float):
    """One-sided Clopper-Pearson upper bound on a rate, ``k`` events in ``n`` trials, at confidence ``1 - a``
    (``k`` a number or an array)."""
    beta, _, _ = _scipy()
    k = np.asarray(k, dtype=np.float64)
    return np.where(k >= n, 1.0, beta.ppf(1 - a, k + 1, np.maximum(n - k, 1)))


def epsilon_lower_bound(fp, fn, n_out: int, n_in: int, delta: float, alpha: float = ALPHA):
    """The epsilon that ``fp`` false positives in ``n_out`` and ``fn`` false negatives in ``n_in`` trials
    show, with confidence ``1 - alpha`` (0 when they show none; arrays give arrays)."""
    fpr, fnr = cp_upper(fp, n_out, alpha / 2), cp_upper(fn, n_in, alpha / 2)
    best = np.maximum((1 - delta - fnr) / fpr, (1 - delta - fpr) / fnr)
    return np.log(np.maximum(best, 1.0))


STATISTICS = {"sum+second": (2.0, 1.0), "sum": (1.0, 0.5), "second": (1.0, 0.5)}  # shift with the canary, share
# of the audited events' budget: T = dS/C + dQ/C^2 (the likelihood ratio's), and each release alone (a wrong
# sensitivity or multiplier on one of them)


@lru_cache(maxsize=16)
def design(epsilon: float, delta: float, trials: int, factors: tuple[float, ...] = FACTORS,
           alpha: float = ALPHA, at: tuple[float, ...] = ()) -> dict:
    """The thresholds (one per statistic in ``STATISTICS`` and under-noising factor, the error budget
    ``alpha`` split among them) and what the audit shows with ``trials`` per side: ``detects[f]`` (for
    ``factors`` and ``at``), the epsilon_lb it reaches with probability at least ``1 - alpha`` when every
    multiplier is divided by ``f``, and ``typical``, the epsilon_lb at the median error counts of
    calibrated noise. Cached: do not change what it returns."""
    _, binom, norm = _scipy()
    mu = math.sqrt(1 - SHARES["count"]) * gdp_mu(epsilon, delta)  # the sum and second moment: all but the count
    a = alpha / (len(factors) * len(STATISTICS))  # each threshold's share of the error budget

    def reached(stat, t, f, q):  # epsilon_lb at the q-quantiles of the error counts, multipliers divided by f
        shift, share = STATISTICS[stat]
        s = shift / (mu * math.sqrt(share)) / f  # the statistic's std
        fpr, fnr = norm.sf(t / s), norm.cdf((t - shift) / s)
        fp, fn = (binom.isf(q, trials, fpr), binom.isf(q, trials, fnr)) if q < 0.5 else \
            (binom.median(trials, fpr), binom.median(trials, fnr))
        return epsilon_lower_bound(fp, fn, trials, trials, delta, a)

    grid = np.arange(1, 400) * 0.025
    thresholds = []
    for stat, (shift, share) in STATISTICS.items():
        for f in factors:
            t = grid * shift / (mu * math.sqrt(share)) / f
            thresholds.append((stat, float(t[np.argmax(reached(stat, t, f, alpha / 2))])))

    def best(f, q):
        return max(float(reached(stat, np.array([t]), f, q)[0]) for stat, t in thresholds)
    return {"epsilon": epsilon, "delta": delta, "trials": trials, "alpha": alpha, "thresholds": thresholds,
            "typical": best(1.0, 0.5), "detects": {f: best(f, alpha / 2) for f in sorted({*factors, *at})}}


def canary_statistics(epsilon: float, delta: float, classes: int, rounds: int,
                      bound: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[dS / C, dQ / C^2]`` (rows) of the classes without the canary and of those with it, over ``rounds``
    private releases (``Budget`` and ``ClippedMoments``: the code ``dfkd record --privacy`` runs). A bound
    other than 1 tells a sum's sensitivity ``C`` from a second moment's ``C^2``."""
    half = classes // 2
    budget = Budget.new(epsilon, delta, 3 * classes, ["canary"], {"canary": bound})
    ordinary = torch.tensor([0.5, -0.25], dtype=torch.float64).repeat(classes).view(-1, 1) * bound
    x = torch.cat([ordinary, torch.full((half, 1), 1e6 * bound, dtype=torch.float64)])  # canaries: clipped to C
    y = torch.cat([torch.arange(classes).repeat_interleave(2), torch.arange(half)])  # canaries in 0 .. half-1
    base = ClippedMoments(classes, 1, False, bound)
    base.update(x, y)
    counts = torch.bincount(y, minlength=classes)
    s0, q0 = 0.25 * bound, 0.3125 * bound ** 2  # the two ordinary examples' sum and sum of squares
    out = []
    for _ in range(rounds):
        m = ClippedMoments(classes, 1, False, bound)
        m.sum, m.second = base.sum.clone(), base.second.clone()
        budget.release("canary", m, budget.noisy_counts(counts))
        out.append(torch.stack([(m.sum[:, 0] - s0) / bound, (m.second[:, 0] - q0) / bound ** 2]))
    t = torch.stack(out, 1)  # [2, rounds, classes]
    return t[:, :, half:].flatten(1), t[:, :, :half].flatten(1)


def audit(epsilon: float, delta: float, classes: int = 2000, rounds: int = 200,
          factors: tuple[float, ...] = FACTORS, alpha: float = ALPHA) -> dict:
    """Run the canaries and compare: ``passes`` when the empirical lower bound is at most the claimed epsilon."""
    d = design(epsilon, delta, classes // 2 * rounds, factors, alpha)
    t_out, t_in = canary_statistics(epsilon, delta, classes, rounds)
    pick = {"sum+second": lambda t: t[0] + t[1], "sum": lambda t: t[0], "second": lambda t: t[1]}
    fp = np.array([int((pick[s](t_out) > t).sum()) for s, t in d["thresholds"]])
    fn = np.array([int((pick[s](t_in) <= t).sum()) for s, t in d["thresholds"]])
    a = alpha / len(d["thresholds"])
    lb = float(epsilon_lower_bound(fp, fn, t_out.shape[1], t_in.shape[1], delta, a).max())
    return dict(d, fp=fp.tolist(), fn=fn.tolist(), epsilon_lb=lb, passes=lb <= epsilon)


# --- per-release audit: each release against its own share of the budget ------------------------------------------
#
# A release with noise multiplier ``z`` (std ``z`` times its sensitivity) is ``mu``-Gaussian-DP with ``mu = 1 / z``
# (Dong, Roth & Su 2019), and ``mu``s compose as ``sqrt(sum mu^2)``: the count's 5 % share is ``mu ~ 0.087`` at a
# claimed (1, 1e-3), so halving its multiplier alone moves the whole mechanism only to epsilon ~ 1.09, which no
# audit against the overall epsilon can see. Here each release kind is audited against the ``mu`` the accountant
# calibrated it to (``sqrt(share) / calibrate(...)``, not ``Budget.multiplier``: a wrong multiplier must not move
# the target). ``n`` draws of the real release function on neighbouring inputs, without and with a canary of
# maximal contribution (made by the real clipping code), are projected on the canary's difference ``d``:
# ``T = <release, d>``, ``N(m, s^2)`` without and ``N(m + |d|^2, s^2)`` with, so ``mu_hat = (mean_in - mean_out) /
# pooled std`` estimates the release's ``mu`` and ``mu_hat * sqrt(n / 2)`` is exactly noncentral-t (``2n - 2``
# degrees of freedom, noncentrality ``mu sqrt(n / 2)``). A kind passes when ``mu_hat`` lies in the two-sided
# interval that holds it with probability ``1 - alpha / (2 K)`` each side for the calibrated ``mu`` (``K`` kinds:
# correct code fails anywhere with probability at most ``alpha``); ``release_design`` computes the probability
# that the kind still passes with its multiplier halved (``2 mu``), at most ``alpha`` by choice of ``n``.
# (The released counts are rounded, post-processing: the noise's variance grows by 1/12 of a count, 6e-4 of
# its own, which moves the count's mu_hat by 3e-5, against the interval's half-width of 0.036.)

RELEASES = ("count", "clip histogram", "sum", "second moment", "full covariance")
EVENTS = {"count": "count", "clip histogram": "chosen: clip histogram", "sum": "given: sum",
          "second moment": "given: second moment", "full covariance": "given: second moment"}


def release_budget(epsilon: float, delta: float, bound: float) -> Budget:
    """The audited plan: a record ``given`` with a user bound and a record ``chosen`` whose bound is chosen by
    its noisy histogram, so every kind of event is in the composition (count, clip histogram, sums, seconds)."""
    return Budget.new(epsilon, delta, 1000, ["given", "chosen"], {"given": bound})


def calibrated_mu(budget: Budget) -> dict[str, float]:
    """Each release kind's Gaussian-DP ``mu`` (``1 / multiplier``) from its share and the accountant's scale,
    and ``"composed"``, ``sqrt(sum mu^2)`` over every event of the file."""
    scale = calibrate(budget.epsilon, budget.delta, budget.groups())
    shares = {ev: round(w, 12) for ev, w in budget.shares().items()}
    out = {k: math.sqrt(shares[ev]) / scale for k, ev in EVENTS.items()}
    out["composed"] = math.sqrt(sum(shares.values())) / scale
    return out


@lru_cache(maxsize=16)
def release_design(epsilon: float, delta: float, n: int, alpha: float = ALPHA, bound: float = 3.0) -> dict:
    """Per kind: the calibrated ``mu``, the pass interval of ``mu_hat`` (``lo``, ``hi``), the probability that
    correct code fails it (``p_false_alarm``, at most ``alpha / K``) and that code with this kind's multiplier
    halved passes it (``p_miss_halved``). Cached: do not change what it returns."""
    from scipy.stats import nct
    mus = calibrated_mu(release_budget(epsilon, delta, bound))
    df, k, a = 2 * n - 2, math.sqrt(n / 2), alpha / (2 * len(RELEASES))
    out = {"n": n, "alpha": alpha, "composed_mu": mus["composed"], "claim_mu": gdp_mu(epsilon, delta), "kinds": {}}
    for kind in RELEASES:
        mu = mus[kind]
        lo, hi = nct.ppf(a, df, mu * k) / k, nct.isf(a, df, mu * k) / k
        halved = float(nct.cdf(hi * k, df, 2 * mu * k) - nct.cdf(lo * k, df, 2 * mu * k))
        out["kinds"][kind] = {"mu": mu, "lo": float(lo), "hi": float(hi), "p_false_alarm": 2 * a,
                              "p_miss_halved": halved}
    return out


def _clipped(x: torch.Tensor, full: bool, bound: float) -> ClippedMoments:
    m = ClippedMoments(1, x.shape[1], full, bound)
    m.update(x, torch.zeros(len(x), dtype=torch.long))
    return m


def release_draws(budget: Budget, n: int, bound: float = 3.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``n`` draws a side of each release kind's projected statistic ``T = <release, d>``, without and with the
    canary, through the real release functions (``Budget.noisy_counts``, ``Budget.noisy_histogram``,
    ``Budget.release`` with diagonal and full second moments): the draws are the rows of one batched call (the
    histogram's: ``n / CELLS`` rows of every cell, a canary in each cell, noise independent per cell)."""
    out = {}
    counts = torch.full((n,), 1000, dtype=torch.long)  # far above the floor of 2
    out["count"] = (budget.noisy_counts(counts).double(), budget.noisy_counts(counts + 1).double())
    r = torch.tensor([0.3, 1.0, 1.1, 2.5, 7.0], dtype=torch.float64)  # norms of ordinary examples
    centres = 2.0 ** (LOG2_LOW + LOG2_STEP * (torch.arange(CELLS, dtype=torch.float64) + 0.5))
    h0, h1 = histogram(r), histogram(torch.cat([r, centres]))  # one canary per cell: every cell is its own trial
    assert bool((h1 - h0 == 1).all()) and n % CELLS == 0  # (the noise is independent per cell)
    out["clip histogram"] = tuple((budget.noisy_histogram("chosen", h.repeat(n // CELLS, 1)) - h0).flatten()
                                  for h in (h0, h1))
    ordinary = torch.tensor([[0.5, -0.25], [-0.3, 0.6]], dtype=torch.float64) * bound
    canary = torch.tensor([[1e6 * bound, 0.0]], dtype=torch.float64)  # clipped to C e_0: +C, +C^2, C^2 e_0 e_0^T
    for full in (False, True):
        base, both = _clipped(ordinary, full, bound), _clipped(torch.cat([ordinary, canary]), full, bound)
        ds, dq = both.sum[0] - base.sum[0], both.second[0] - base.second[0]
        res = []
        for src in (base, both):
            m = ClippedMoments(n, 2, full, bound)
            m.sum, m.second = src.sum.repeat(n, 1), src.second.repeat(n, *[1] * (src.second.dim() - 1))
            budget.release("given", m, counts.double())
            res.append((m.sum @ ds, m.second.flatten(1) @ dq.flatten()))
        if full:
            out["full covariance"] = (res[0][1], res[1][1])
        else:
            out["sum"], out["second moment"] = (res[0][0], res[1][0]), (res[0][1], res[1][1])
    return {k: (a.double().numpy(), b.double().numpy()) for k, (a, b) in out.items()}


def mu_hat(t_out: np.ndarray, t_in: np.ndarray) -> float:
    """The Gaussian-DP ``mu`` two samples show: difference of means over the pooled std (inf for exact data)."""
    n = len(t_out)
    var = (((t_out - t_out.mean()) ** 2).sum() + ((t_in - t_in.mean()) ** 2).sum()) / (2 * n - 2)
    diff = float(t_in.mean() - t_out.mean())
    return diff / math.sqrt(var) if var > 0 else (math.inf if diff else 0.0)


def release_audit(epsilon: float = 1.0, delta: float = 1e-3, n: int = 42_000, alpha: float = ALPHA,
                  bound: float = 3.0) -> dict:
    """Audit every release kind against its own calibrated ``mu``: ``kinds[k]`` holds ``mu``, the interval,
    ``mu_hat`` and ``passes``; ``passes`` overall when every kind passes and the kinds' ``mu``s compose within
    the claim's Gaussian-DP ``mu``."""
    d = release_design(epsilon, delta, n, alpha, bound)
    draws = release_draws(release_budget(epsilon, delta, bound), n, bound)
    kinds = {}
    for kind, row in d["kinds"].items():
        m = mu_hat(*draws[kind])
        kinds[kind] = dict(row, mu_hat=m, passes=bool(row["lo"] <= m <= row["hi"]))
    composes = d["composed_mu"] <= d["claim_mu"] * (1 + 1e-3)
    return dict(d, kinds=kinds, composes=composes,
                failed=[k for k, v in kinds.items() if not v["passes"]],
                passes=composes and all(v["passes"] for v in kinds.values()))
