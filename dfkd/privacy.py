"""Differentially private statistics: ``dfkd record --privacy EPSILON [--delta D]``.

Neighbouring training sets differ by adding or removing one example (its input and its
label). A *record* is one Gaussian the file stores (``kinds``): the top layer, one all-layers
or class-diag layer, or one spectral graph's Fourier coefficients. Each gives every example a vector ``x [D]`` (a
conv map per channel: its ``P`` position vectors ``[D, P]``), whose norm
``r = ||x||`` (pooled: ``sqrt(mean_p ||x_p||^2)``) is clipped to the record's bound ``C``
by scaling the whole example. Per class the released quantities are then

- the count (L2 sensitivity 1: one example moves one class's count by one);
- the sum of ``x`` (pooled: of its position mean), sensitivity ``C``;
- the sum of ``x x^T`` (pooled: its position mean; diagonal records: of ``x^2``),
  sensitivity ``C^2`` (``||x x^T||_F = ||x||^2``; the pooled bound by Jensen).

Each gets Gaussian noise ``N(0, (z_j * sensitivity_j)^2)`` on every entry (a symmetric
matrix: on its upper triangle, mirrored). A bound the user does not give is chosen on a
stated share of the same budget: a noisy histogram of the record's log2 norms (sensitivity
1), read at a quantile. The multipliers are ``z_j = s / sqrt(w_j)`` for budget shares
``w_j``, and ``s`` is calibrated with Google's ``dp-accounting`` (privacy loss
distributions; ``accountant``) so that the composition of every event meets ``(epsilon, delta)``; the file's
header lists every event. Everything after the noise is post-processing and costs no
privacy: ``mean = S / n``, ``cov = Q / n - mean mean^T`` projected onto the PSD cone
(eigenvalues clamped at 0), spectral coefficients kept by their noisy energy.

The noise is drawn from the operating system's entropy (``noise``: ``os.urandom``), never from a
seed, which with the public code and the header would regenerate it. Tests alone set
``noise.INSECURE_TEST_NOISE_SEED`` for reproducible noise; a file made so says it is not private.

What this covers: what the statistics file adds to a release, not the model's weights
(a model trained without a private optimiser leaks on its own), and not the header's public
values (``privacy_report.public_values``: each stated with where it comes from).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .accountant import calibrate, check, default_delta, epsilon_of
from .errors import DfkdError
from .noise import NOISE_INSECURE, NOISE_SECURE, NoiseSource
from .privacy_report import clip_report

SHARES = {"clip": 0.05, "count": 0.05, "moments": 0.90}  # of the budget, in squared Gaussian-DP mu
LOG2_LOW, LOG2_STEP, CELLS = -10.0, 0.5, 60  # the clip histograms' cells: log2 norms -10 .. 20 by 1/2
NEIGHBOURS = "add or remove one training example (input and label)"
def histogram(r: torch.Tensor) -> torch.Tensor:
    """Counts of norms ``r`` per log2 cell (norms below or above the grid go to its end cells)."""
    i = ((r.double().clamp(min=1e-300).log2() - LOG2_LOW) / LOG2_STEP).floor().clamp(0, CELLS - 1).long()
    return torch.bincount(i, minlength=CELLS)


def norms(x: torch.Tensor) -> torch.Tensor:
    """Per-example norm: ``||x_i||`` for ``[N, D]``, ``sqrt(mean_p ||x_ip||^2)`` for ``[N, D, P]``."""
    x = x.detach().double()
    return (x * x).flatten(1).sum(1).div(x.shape[2] if x.dim() == 3 else 1).sqrt()


class ClippedMoments:
    """Per-class sums of clipped contributions, in float64: ``S = sum x`` and ``Q = sum x x^T``
    (or ``sum x^2``), each example scaled to norm at most ``bound`` first."""

    def __init__(self, num_classes: int, dim: int, full: bool, bound: float):
        self.full, self.bound = full, bound
        self.sum = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.second = torch.zeros((num_classes, dim, dim) if full else (num_classes, dim), dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().cpu().double()
        x = x * (self.bound / norms(x).clamp(min=self.bound)).view(-1, *[1] * (x.dim() - 1))
        pooled = x.dim() == 3
        p = x.shape[2] if pooled else 1
        for c in torch.unique(y).tolist():
            part = x[y == c]
            if pooled:
                self.sum[c] += part.mean(2).sum(0)
                flat = part.transpose(0, 1).reshape(part.shape[1], -1)  # [D, n * P]
                self.second[c] += (flat @ flat.T if self.full else (flat * flat).sum(1)) / p
            else:
                self.sum[c] += part.sum(0)
                self.second[c] += part.T @ part if self.full else (part * part).sum(0)


def noise_like(t: torch.Tensor, sigma: float, source: NoiseSource, symmetric: bool = False) -> torch.Tensor:
    """Gaussian noise of std ``sigma`` on every entry (``symmetric``: on the upper triangle of the
    last two dims, mirrored, so a symmetric matrix stays symmetric and each entry is drawn once)."""
    e = source.normal(t.shape) * sigma
    if symmetric:
        e = torch.triu(e) + torch.triu(e, 1).transpose(-1, -2)
    return e


def psd(cov: torch.Tensor) -> torch.Tensor:
    """The nearest PSD matrices (Frobenius): eigenvalues clamped at 0."""
    vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    return (vecs * vals.clamp(min=0).unsqueeze(-2)) @ vecs.transpose(-1, -2)


@dataclass
class Released:
    """A record's post-processed class Gaussian (the interface of ``stats.ClassMoments``)."""
    mean: torch.Tensor
    cov: torch.Tensor

    def covariance(self) -> torch.Tensor:
        return self.cov


def finish(m: ClippedMoments, counts: torch.Tensor) -> Released:
    """Post-processing of noisy sums: class means and PSD covariances."""
    n = counts.view(-1, 1)
    mean = m.sum / n
    if m.full:
        return Released(mean, psd(m.second / n.unsqueeze(2) - torch.einsum("ci,cj->cij", mean, mean)))
    return Released(mean, (m.second / n - mean * mean).clamp(min=0))


@dataclass
class Budget:
    """The privacy plan of one file: targets, records, bounds, and the calibrated multipliers."""
    epsilon: float
    delta: float
    records: list[str]
    bounds: dict[str, float] = field(default_factory=dict)  # given by the user, then the chosen ones
    to_choose: tuple[str, ...] = ()  # the records whose bound is chosen privately (fixed at the start)
    quantile: float = 0.95
    noise: NoiseSource = field(default_factory=NoiseSource)  # never seeded by a user
    chosen: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def new(cls, epsilon: float, delta: float | None, n_hint: int, records: list[str],
            bounds: dict[str, float] | None = None, quantile: float = 0.95) -> "Budget":
        check(epsilon, delta, quantile)
        bounds = dict(bounds or {})
        unknown = sorted(set(bounds) - set(records))
        if unknown:
            raise DfkdError("--clip", f"no record {unknown[0]!r} in this file; records: {', '.join(records)}")
        bad = [k for k, v in bounds.items() if not (v > 0 and math.isfinite(v))]
        if bad:
            raise DfkdError("--clip", f"{bad[0]}: a bound must be a positive number")
        return cls(epsilon, default_delta(n_hint) if delta is None else delta, list(records), bounds,
                   tuple(r for r in records if r not in bounds), quantile)

    def shares(self) -> dict[str, float]:
        """Each event's share of the budget (the clip share goes to the moments when every bound is given)."""
        clip = SHARES["clip"] if self.to_choose else 0.0
        moments = (SHARES["moments"] + SHARES["clip"] - clip) / (2 * len(self.records))
        out = {"count": SHARES["count"]}
        for r in self.to_choose:
            out[f"{r}: clip histogram"] = clip / len(self.to_choose)
        for r in self.records:
            out[f"{r}: sum"] = moments
            out[f"{r}: second moment"] = moments
        return out

    def groups(self) -> tuple[tuple[float, int], ...]:
        counts: dict[float, int] = {}
        for w in self.shares().values():
            counts[round(w, 12)] = counts.get(round(w, 12), 0) + 1
        return tuple(sorted(counts.items()))

    @property
    def scale(self) -> float:
        return calibrate(self.epsilon, self.delta, self.groups())

    def multiplier(self, event: str) -> float:
        return self.scale / math.sqrt(round(self.shares()[event], 12))  # the share the accountant composed

    def noisy_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Released class counts (at least 2: a post-processing floor)."""
        z = self.multiplier("count")
        return (counts.double() + noise_like(counts.double(), z, self.noise)).round().clamp(min=2)

    def noisy_histogram(self, record: str, h: torch.Tensor) -> torch.Tensor:
        """A record's released log2-norm histogram (``histogram``; sensitivity 1): its counts plus noise of std
        the clip histogram's multiplier on every cell (any shape: each entry drawn independently)."""
        h = h.double()
        return h + noise_like(h, self.multiplier(f"{record}: clip histogram"), self.noise)

    def choose_bounds(self, hists: dict[str, torch.Tensor]) -> None:
        """Bounds from noisy log2-norm histograms (``histogram``): cells whose noisy count is below three
        noise stds are taken as empty (so the noise of many empty cells does not add up), then the bound
        is the upper edge of the first cell at which the cumulative share reaches ``quantile``. Each choice
        keeps what the released histogram says of it, judged at release (``privacy_report.clip_report``)."""
        for r in self.to_choose:
            z = self.multiplier(f"{r}: clip histogram")
            i, median, stood_out = choose_cells(self.noisy_histogram(r, hists[r]), z, self.quantile)
            self.bounds[r] = 2.0 ** (LOG2_LOW + LOG2_STEP * (i + 1))
            self.chosen[r] = {"bound": self.bounds[r], "by": f"noisy histogram of log2 norms, quantile {self.quantile}",
                              "median_norm": 2.0 ** (LOG2_LOW + LOG2_STEP * (median + 0.5)), "stood_out": stood_out,
                              "histogram_noise": z}

    def release(self, name: str, m: ClippedMoments, counts: torch.Tensor) -> Released:
        """Noise on a record's sums, then post-processing with the released ``counts``."""
        c = m.bound
        m.sum += noise_like(m.sum, self.multiplier(f"{name}: sum") * c, self.noise)
        m.second += noise_like(m.second, self.multiplier(f"{name}: second moment") * c * c, self.noise,
                               symmetric=m.full)
        b = self.chosen.get(name)
        if b is not None:  # judged on released quantities only
            b["released_n"] = float(counts.sum())
            b |= clip_report(c, b["median_norm"], b["stood_out"], b["histogram_noise"], b["released_n"],
                             self.multiplier(f"{name}: sum") * c * math.sqrt(m.sum.shape[1]) / float(counts.min()))
        return finish(m, counts)

    def header(self) -> dict:
        """What the file states: targets, accountant, and every event's sensitivity and multiplier."""
        from importlib.metadata import version
        events = []
        for ev, w in self.shares().items():
            rec, _, what = ev.partition(": ")
            sens = 1.0 if what in ("", "clip histogram") else (self.bounds[rec] if what == "sum" else self.bounds[rec] ** 2)
            z = self.multiplier(ev)
            events.append({"release": ev, "share": w, "sensitivity": sens, "noise_multiplier": z, "sigma": z * sens})
        return {"epsilon": epsilon_of(self.scale, self.groups(), self.delta), "target_epsilon": self.epsilon,
                "delta": self.delta, "neighbouring": NEIGHBOURS, "mechanism": "Gaussian",
                "accountant": "dp_accounting PLD (privacy loss distributions)",
                "accountant_version": version("dp-accounting"), "scale": self.scale,
                "clip_bounds": {r: {"bound": self.bounds[r], "by": "user"} for r in self.records if r not in self.chosen}
                | self.chosen, "events": events,
                "noise": NOISE_INSECURE if self.noise.insecure else NOISE_SECURE,
                "covers": "the statistics in this file; not the model's weights, not the values listed as public"}


def choose_cells(noisy: torch.Tensor, z: float, quantile: float) -> tuple[int, int, bool]:
    """A noisy histogram's cells at ``quantile`` and at the median, and whether any cell stood out of the noise:
    cells below three noise stds ``z`` count as empty (so many empty cells' noise does not add up); when none
    is above, the fullest noisy cell alone (a guess)."""
    kept = torch.where(noisy > 3 * z, noisy, torch.zeros_like(noisy))
    stood_out = float(kept.sum()) > 0
    if not stood_out:
        kept = (noisy == noisy.max()).double()
    cum = kept.cumsum(0)
    return int((cum >= quantile * cum[-1]).nonzero()[0]), int((cum >= 0.5 * cum[-1]).nonzero()[0]), stood_out
