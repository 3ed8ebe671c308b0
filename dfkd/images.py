"""A dependency-free PNG writer and a per-class sample grid, to look at reconstructions."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from .checkpoint import atomic_write


def png_bytes(img: torch.Tensor) -> bytes:
    """8-bit grayscale ``[H, W]`` or RGB ``[H, W, 3]`` uint8 tensor to PNG bytes."""
    img = img.contiguous()
    h, w = img.shape[:2]
    color = 2 if img.dim() == 3 else 0
    rows = img.view(h, -1).numpy()
    raw = b"".join(b"\x00" + rows[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def class_grid(x: torch.Tensor, labels: torch.Tensor, per_class: int = 10, scale: int = 2) -> torch.Tensor:
    """One row per class of up to ``per_class`` images ``[N, 1, H, W]`` in [0, 1], 2-pixel gaps."""
    classes = int(labels.max()) + 1
    _, _, h, w = x.shape
    gap = 2
    grid = torch.full((classes * (h + gap) + gap, per_class * (w + gap) + gap), 0.5)
    for c in range(classes):
        for j, img in enumerate(x[labels == c][:per_class]):
            top, left = gap + c * (h + gap), gap + j * (w + gap)
            grid[top:top + h, left:left + w] = img[0].clamp(0, 1)
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (grid * 255).round().to(torch.uint8)


def save_grid(path: str | Path, x: torch.Tensor, labels: torch.Tensor, per_class: int = 10) -> Path:
    return atomic_write(path, png_bytes(class_grid(x, labels, per_class)))
