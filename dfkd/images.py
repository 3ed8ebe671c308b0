"""A per-class sample grid of reconstructed images, written as PNG with Pillow."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write


def class_grid(x: torch.Tensor, labels: torch.Tensor, per_class: int = 10, scale: int = 2,
               lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """One row per class of up to ``per_class`` raw images ``[N, C, H, W]`` (values in ``[lo, hi]``),
    2-pixel grey gaps; uint8 ``[rows, cols]`` (one channel) or ``[rows, cols, 3]``."""
    classes = int(labels.max()) + 1
    _, c, h, w = x.shape
    gap = 2
    grid = torch.full((c, classes * (h + gap) + gap, per_class * (w + gap) + gap), 0.5)
    for k in range(classes):
        for j, img in enumerate(x[labels == k][:per_class]):
            top, left = gap + k * (h + gap), gap + j * (w + gap)
            grid[:, top:top + h, left:left + w] = ((img - lo) / (hi - lo)).clamp(0, 1)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    out = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return out[:, :, 0] if c == 1 else out[:, :, :3]


def save_grid(path: str | Path, x: torch.Tensor, labels: torch.Tensor, per_class: int = 10,
              lo: float = 0.0, hi: float = 1.0) -> Path:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(class_grid(x, labels, per_class, lo=lo, hi=hi)).save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())
