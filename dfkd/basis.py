"""The basis reconstruction optimises its inputs in (``ReconstructConfig.basis``).

``pixel`` (the paper's): Adam on the raw values themselves. ``fourier``: Adam on the Fourier coefficients of
the change from the start, in the network's input units (``Fourier``): the image is
``z0 + M · irfft2(s ⊙ c)`` per input (``irfft2`` orthonormal), with ``c`` the coefficients (zero at the start,
so the first image is the start itself), ``s`` each frequency ``f`` (cycles per pixel) weighted
``1 / max(f, 1 / max(H, W))^decay``, normalised to a root mean square of 1, and ``M`` a colour matrix that
mixes any three channels, in the network's input units, from a luminance-led, decorrelated basis
(``COLOUR`` over its largest column norm; the identity for other channel counts). Adam then moves the
coarse, grey patterns of an input faster than its fine, coloured ones (the chroma directions at about a
quarter and an eighth of the luminance's rate): the decorrelated parametrisation of feature visualisation
(Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017); ``COLOUR`` is the square root of
ImageNet's colour correlation as published there. The imaginary parts of the zero (and, for an even width,
the last) column's coefficients do not reach the image (``irfft2`` drops them); they never move.
Reconstruction clamps the image as the network sees it, not the coefficients: a pixel clamped at the range's
edge gets no gradient until other coefficients' steps bring it back in range.
"""
from __future__ import annotations

import torch

BASES = ("pixel", "fourier")
COLOUR = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


def spectrum_scale(h: int, w: int, decay: float = 1.0) -> torch.Tensor:
    """``[h, w // 2 + 1]``: each rfft2 frequency's weight ``1 / max(f, 1 / max(h, w))^decay``, root mean square 1."""
    f = (torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2
         + torch.fft.rfftfreq(w, dtype=torch.float64)[None, :] ** 2).sqrt()
    s = f.clamp(min=1.0 / max(h, w)) ** -decay
    return s / s.pow(2).mean().sqrt()


def colour_matrix(c: int) -> torch.Tensor:
    """``[c, c]``: ``COLOUR`` over its largest column norm for three channels, else the identity."""
    if c != 3:
        return torch.eye(c)
    m = torch.tensor(COLOUR)
    return m / m.norm(dim=0).max()


class Fourier:
    """Inputs ``z0 + M · irfft2(s ⊙ c)`` (``[N, C, H, W]``, the network's input units) of learnable coefficients
    ``coef`` (``[N, C, H, W // 2 + 1, 2]``, real and imaginary parts), zero at the start."""

    def __init__(self, z0: torch.Tensor, decay: float = 1.0):
        if z0.dim() != 4:
            raise ValueError("the Fourier basis takes images [N, C, H, W]")
        n, c, h, w = z0.shape
        self.z0 = z0.detach()
        self.scale = spectrum_scale(h, w, decay).to(z0)
        self.colour = colour_matrix(c).to(z0)
        self.coef = torch.zeros((n, c, h, w // 2 + 1, 2), dtype=z0.dtype, device=z0.device, requires_grad=True)

    def image(self) -> torch.Tensor:
        h, w = self.z0.shape[-2:]
        d = torch.fft.irfft2(torch.view_as_complex(self.coef) * self.scale, s=(h, w), norm="ortho")
        return self.z0 + torch.einsum("ij,njhw->nihw", self.colour, d)
