"""Streaming per-class statistics and graph-Fourier bases: pure tensor math, no files, no models.

Moments are merged batch by batch with Chan et al.'s pairwise update in float64,
so the streamed result equals ``torch.cov`` on the concatenated data (unbiased,
``n - 1``) to rounding.

Spectral basis. A feed-forward adjacency is nilpotent, so we use the symmetric
graph Laplacian of the absolute weights, ``L = D - A`` with
``A = [[0, |W|^T], [|W|, 0]]`` per pair of adjacent layers (block tridiagonal
for the whole network). Its orthonormal eigenvectors ``V`` (``L = V diag(lam) V^T``)
define the graph Fourier transform ``s_hat = V^T s`` and its inverse ``s = V s_hat``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .moments import cycle, moments


class ClassMoments:
    """Per-class count, mean and (full or diagonal) second central moment, streamed."""

    def __init__(self, num_classes: int, dim: int, full: bool):
        self.full = full
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mean = torch.zeros(num_classes, dim, dtype=torch.float64)
        shape = (num_classes, dim, dim) if full else (num_classes, dim)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Merge a batch ``x [N, D]`` (or ``[N, D, P]``: ``P`` positions per sample, each a row of
        the sample's class, as BatchNorm pools a conv map) with class labels ``y [N]``. The batch is
        sorted by class once and each class's moments are taken on its contiguous slice. Rows
        are centred on the batch's class mean before their products are summed (float64 for
        ``[N, D]``; float32 products of centred values for pooled maps, summed in float64)."""
        y = y.cpu()
        order = torch.argsort(y, stable=True)
        pooled = x.dim() == 3
        xs = x.detach().cpu()[order]
        xs = xs.float() if pooled else xs.to(torch.float64)
        counts = torch.bincount(y, minlength=len(self.count))
        nb = counts.to(torch.float64) * (x.shape[2] if pooled else 1)
        mb = torch.zeros_like(self.mean)
        m2b = torch.zeros_like(self.m2)
        for c, part in enumerate(torch.split(xs, counts.tolist())):
            if not len(part):
                continue
            if pooled:
                part = part.transpose(0, 1).reshape(part.shape[1], -1)  # [D, n * P]
                centre = part.mean(1)
                d = part - centre.unsqueeze(1)
                r = d.mean(1).double()  # what the float32 centre missed
                mb[c] = centre.double() + r
                m = d.shape[1]
                m2b[c] = (_gram64(d) - m * torch.outer(r, r)) if self.full else \
                    ((d * d).sum(1, dtype=torch.float64) - m * r * r)
            else:
                mb[c] = part.mean(0)
                d = part - mb[c]
                m2b[c] = d.T @ d if self.full else (d * d).sum(0)
        na = self.count
        n = na + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n.clamp(min=1)).unsqueeze(1)
        w = na * nb / n.clamp(min=1)
        corr = (torch.einsum("ci,cj->cij", delta, delta) * w.view(-1, 1, 1) if self.full
                else delta * delta * w.unsqueeze(1))
        self.m2 += m2b + corr
        self.count = n

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance per class: ``[C, D, D]`` if full, else variances ``[C, D]``."""
        denom = (self.count - 1).clamp(min=1)
        return self.m2 / (denom.view(-1, 1, 1) if self.full else denom.view(-1, 1))


GRAM_CHUNK = 4096


def _gram64(d: torch.Tensor) -> torch.Tensor:
    """``d @ d.T`` of a float32 ``[D, M]``, summed in float64 over chunks of ``GRAM_CHUNK`` columns: a
    float32 product over 10^5 positions loses about 1e-4 relative (how much depends on the BLAS
    kernel, so on the machine); a chunk's loses about 1e-6."""
    out = torch.zeros(d.shape[0], d.shape[0], dtype=torch.float64)
    for blk in torch.split(d, GRAM_CHUNK, dim=1):
        out += (blk @ blk.T).double()
    return out


def cholesky_psd(cov: torch.Tensor, rel_jitter: float = 1e-6, tries: int = 12) -> tuple[torch.Tensor, float]:
    """Cholesky factors of PSD matrices ``[..., D, D]``.

    A rank-deficient covariance (dead ReLU units, fewer samples than units) has no
    Cholesky factor, so ``eps * I`` is added with ``eps = rel_jitter * mean(diag)``,
    multiplied by 10 until every factorisation succeeds. Returns the factor and the
    absolute jitter that was used (0.0 when none was needed).
    """
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    scale = cov.diagonal(dim1=-2, dim2=-1).mean().clamp(min=1e-12).item()
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    jitter = 0.0
    for _ in range(tries):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info.max()) == 0:
            return chol, jitter
        jitter = rel_jitter * scale if jitter == 0.0 else jitter * 10
    raise ValueError(f"covariance is not positive semi-definite even with jitter {jitter:g}")


def low_rank(cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cov ~ F F^T + diag(r)``: top-``rank`` eigenpairs as ``F [..., D, k]``, and the
    residual variances ``r >= 0`` so that the diagonal is kept exactly."""
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals[..., -rank:].clamp(min=0), vecs[..., -rank:]
    factor = vecs * vals.sqrt().unsqueeze(-2)
    resid = (cov.diagonal(dim1=-2, dim2=-1) - (factor * factor).sum(-1)).clamp(min=0)
    return factor, resid


def laplacian(adj: torch.Tensor) -> torch.Tensor:
    """Combinatorial Laplacian ``D - A`` of a symmetric non-negative adjacency."""
    return torch.diag(adj.sum(1)) - adj


def fourier_basis(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending graph frequency) and orthonormal eigenvectors of the Laplacian, in float64."""
    return torch.linalg.eigh(laplacian(adj.to(torch.float64)))


def block_adjacency(sizes: list[int], edges: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Symmetric adjacency over concatenated node blocks; ``edges[(a, b)]`` is ``[n_a, n_b]``."""
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    adj = torch.zeros(offs[-1], offs[-1], dtype=torch.float64)
    for (a, b), w in edges.items():
        adj[offs[a]:offs[a + 1], offs[b]:offs[b + 1]] = w
        adj[offs[b]:offs[b + 1], offs[a]:offs[a + 1]] = w.T
    return adj


SELECT_N = 2000  # samples that decide which Fourier coefficients are kept (energy ranking only)


class SpectralMoments:
    """Per-class mean and variance of the kept graph-Fourier coefficients of a signal.

    Which coefficients are kept (the ``keep`` fraction with the largest mean energy
    ``E[s_hat_k^2]``) is decided on the first ``select_n`` samples streamed (buffered,
    then replayed), so the full ``D x D`` transform is paid on those only; the moments
    then cover every sample. The projections run in float32 (the precision the file stores),
    the moments accumulate in float64. Diagonal moments in the Fourier domain are the stationary
    graph-signal model: they stand for a full covariance in the vertex domain.
    """

    def __init__(self, basis: torch.Tensor, num_classes: int, keep: float, select_n: int = SELECT_N):
        self.basis = basis.to(torch.float64)
        self._basis32 = self.basis.float()
        self.k = max(1, round(keep * basis.shape[1]))
        self.num_classes, self.select_n = num_classes, select_n
        self.kept: torch.Tensor | None = None
        self.energy: torch.Tensor | None = None
        self.moments = ClassMoments(num_classes, self.k, full=False)
        self._buf: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _select(self) -> None:
        s = torch.cat([b for b, _ in self._buf])[: self.select_n]
        self.energy = ((s @ self._basis32).double() ** 2).mean(0)
        self.kept = torch.argsort(self.energy, descending=True)[: self.k].sort().values
        self.kept_basis = self.basis[:, self.kept].contiguous()
        self._kept32 = self.kept_basis.float()
        buf, self._buf = self._buf, []
        for s, y in buf:
            self.moments.update(s @ self._kept32, y)

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        s = s.detach().float().cpu()
        if self.kept is None:
            self._buf.append((s, y.cpu()))
            if sum(len(b) for b, _ in self._buf) >= self.select_n:
                self._select()
        else:
            self.moments.update(s @ self._kept32, y)

    def finish(self) -> None:
        if self.kept is None:
            self._select()


def class_moments(out: torch.Tensor, labels: torch.Tensor, k: int, full: bool):
    """Per-class mean ``[K, C]`` and (co)variance of a map's channels pooled over positions, and the
    rows each class covers, from per-sample sums (one batched product, no per-class loop)."""
    z = out.flatten(2)                                  # [B, C, P]
    onehot = F.one_hot(labels, k).to(z.dtype)           # [B, K]
    rows = onehot.sum(0) * z.shape[2]                   # [K]
    denom = rows.clamp(min=1)
    mean = onehot.T @ z.sum(2) / denom[:, None]
    if full:
        second = torch.einsum("bk,bcd->kcd", onehot, z @ z.transpose(1, 2)) / denom[:, None, None]
        return mean, second - mean[:, :, None] * mean[:, None, :], rows
    second = onehot.T @ z.pow(2).sum(2) / denom[:, None]
    return mean, second - mean.pow(2), rows


def whitening(std: torch.Tensor) -> torch.Tensor:
    """Per-coordinate weights ``[D]`` from per-class standard deviations ``[C, D]``."""
    s = std.mean(0)
    return 1.0 / (s + 1e-3 * s.mean())


def unit_match(rows: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               w: torch.Tensor) -> torch.Tensor:
    """Per class present in the batch, its per-unit mean ``m`` and standard deviation ``s`` (``rows [B, D]``;
    unbiased, over the class's ``n`` samples) against the stored ``mu`` and ``sigma`` (``[K, D]``),
    ``(1/d) ||w (m - mu)||^2 + (1/d) ||w (s - sigma)||^2``, weighted by ``n``; a class with one sample in the
    batch has no spread, and only its mean term counts. Standard deviations, not variances: each unit's error
    counts in its own sigma units, as a draw's does (a variance error weighted by ``w^2`` blows up where a unit
    barely varies). Each unit on its own: a full record's correlations are not matched."""
    p = cycle(labels)
    if p:  # each class's rows a strided view: a short backward (``moments``)
        m, var = moments(rows.reshape(len(rows) // p, p, -1), (0,), correction=1)
        mean, std, n = mean[labels[:p]], std[labels[:p]], torch.full((p,), len(rows) // p, dtype=rows.dtype,
                                                                         device=rows.device)
    else:
        onehot = F.one_hot(labels, len(mean)).to(rows.dtype)      # [B, K]
        n = onehot.sum(0)
        m = onehot.T @ rows / n.clamp(min=1)[:, None]
        centred = rows - onehot @ m  # centred first: a unit that barely varies; a one-hot product, whose gradient is
        var = onehot.T @ centred.pow(2) / (n - 1).clamp(min=1)[:, None]  # one too (m[labels]'s index_put took 26% of a step)
    spread = ((((var + 1e-12).sqrt() - std) * w).pow(2).mean(1)) * (n > 1)
    return ((((m - mean) * w).pow(2).mean(1) + spread) * n).sum()


def class_match(out: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
    """Per class present in the batch, the batch's class mean ``m`` and (co)variance ``S`` of a map's
    channels pooled over positions (``out [B, C, ...]``) against the stored ``mu`` and ``Sigma``
    (``cov [K, C, C]``; diagonal: variances ``[K, C]``),
    ``(1/d) ||w (m - mu)||^2 + (1/d^2) ||w w^T . (S - Sigma)||^2`` (diagonal: ``(1/d) ||w^2 (s - sigma^2)||^2``),
    weighted by the samples each class covers."""
    p = cycle(labels)
    if p and cov.dim() == 2:  # diagonal, each class's rows a strided view: a short backward (``moments``)
        z = out.flatten(2)
        m, second = moments(z.reshape(len(z) // p, p, *z.shape[1:]), (0, 3))
        mean, cov = mean[labels[:p]], cov[labels[:p]]
        rows = torch.full((p,), len(z) // p * z.shape[2], dtype=z.dtype, device=z.device)
    else:
        m, second, rows = class_moments(out, labels, len(cov), cov.dim() == 3)
    dm = ((m - mean) * w).pow(2).mean(1)
    ww = w[:, None] * w[None, :] if cov.dim() == 3 else w * w
    dc = ((second - cov) * ww).pow(2).flatten(1).mean(1)
    return ((dm + dc) * rows / out[0, 0].numel()).sum()
