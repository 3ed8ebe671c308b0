"""The conditional generator of ``--synthesis generator``: latents and intended classes in, raw inputs out.

``Generator(shape, classes, latent, width)`` maps ``z ~ N(0, I)`` (``[B, latent]``) and labels ``y`` to
inputs of ``shape`` in the data's raw range ``[low, high]`` (a sigmoid scaled to it, so no clamp is needed):
for images whose sides divide by 4, Fast-Datafree's small convolutional generator (a linear map of
``[z, embed(y)]`` to a ``2 width x H/4 x W/4`` map, two nearest-neighbour upsamplings each followed by a
3x3 convolution, BatchNorm and LeakyReLU, then a 3x3 convolution to the channels); for any other shape an
MLP of the same width. Given ``base`` (each class's start, raw: the class-mean inputs the statistics
reveal), the output is ``sigmoid(logit(base[y]) + net(z, y))`` in the range: it starts near each class's mean
input and learns the variations around it. Its description (``describe``) is plain JSON, so a saved generator is rebuilt from
it and its weights alone (``build``), never from code a file names.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import DfkdError


class Generator(nn.Module):
    def __init__(self, shape: tuple[int, ...], classes: int, latent: int = 64, width: int = 64,
                 low: float = 0.0, high: float = 1.0, base: torch.Tensor | None = None):
        super().__init__()
        if base is not None:  # each class's start (raw): the output is the sigmoid of its logit plus the net's
            if tuple(base.shape) != (classes, *shape):
                raise DfkdError("generator", f"a base of shape {tuple(base.shape)} for {classes} classes of {shape}")
            unit = ((base - low) / (high - low)).clamp(0.02, 0.98)
            self.register_buffer("base", torch.log(unit / (1 - unit)))
        self.anchored = base is not None
        if latent < 1 or width < 1 or classes < 1 or not low < high:
            raise DfkdError("generator", "latent, width and classes must be >= 1, and low < high")
        self.shape, self.classes, self.latent, self.width = tuple(shape), classes, latent, width
        self.low, self.high = float(low), float(high)
        self.embed = nn.Embedding(classes, latent)
        self.conv = len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0
        if self.conv:
            c, h, w = shape
            self.fc = nn.Linear(2 * latent, 2 * width * (h // 4) * (w // 4))
            self.body = nn.Sequential(
                nn.BatchNorm2d(2 * width), nn.Upsample(scale_factor=2),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
                nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
                nn.Conv2d(width, c, 3, padding=1))
        else:
            hidden = 4 * width
            self.fc = nn.Linear(2 * latent, hidden)
            self.body = nn.Sequential(nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                      nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, math.prod(shape)))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], 1))
        if self.conv:
            h = h.view(len(z), 2 * self.width, self.shape[1] // 4, self.shape[2] // 4)
        out = self.body(h).view(len(z), *self.shape)
        if self.anchored:
            out = out + self.base[y]
        return self.low + (self.high - self.low) * torch.sigmoid(out)

    def describe(self) -> dict:
        return {"shape": list(self.shape), "classes": self.classes, "latent": self.latent, "width": self.width,
                "low": self.low, "high": self.high, "anchored": self.anchored}


LIMITS = {"classes": 100_000, "latent": 4096, "width": 4096, "side": 4096, "values": 2 ** 24, "parameters": 2 ** 26}


def parameters(shape: list[int], classes: int, latent: int, width: int) -> int:
    """How many parameters ``Generator(shape, classes, latent, width)`` holds, from its description alone."""
    if len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0:
        c, h, w = shape
        fc = 2 * latent * 2 * width * (h // 4) * (w // 4) + 2 * width * (h // 4) * (w // 4)
        body = 2 * (2 * width) + 9 * (2 * width) ** 2 + 2 * (2 * width) + 9 * 2 * width * width + 2 * width \
            + 9 * width * c + c  # BatchNorm: a weight and a bias per channel
    else:
        hidden = 4 * width
        fc = 2 * latent * hidden + hidden
        body = 2 * hidden + hidden * hidden + hidden + 2 * hidden + hidden * math.prod(shape) + math.prod(shape)
    return classes * latent + fc + body


def _count(desc: dict, key: str, limit: int) -> int:
    v = desc.get(key)
    if not (type(v) is int and 1 <= v <= limit):  # noqa: E721  (a bool is no count)
        raise ValueError(f"{key} must be an integer from 1 to {limit:,}, not {v!r}")
    return v


def build(desc: dict, where: object = "generator") -> Generator:
    """A generator from its description (``Generator.describe``), every field checked (types, bounds: nothing a
    file says allocates more than a generator of ``LIMITS`` would) before anything is built; a malformed one is
    one line on ``where``."""
    try:
        if not isinstance(desc, dict):
            raise ValueError("not a JSON object")
        shape = desc.get("shape")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 3
                and all(type(v) is int and 1 <= v <= LIMITS["side"] for v in shape)  # noqa: E721
                and math.prod(shape) <= LIMITS["values"]):
            raise ValueError(f"shape must be 1 to 3 sides of 1 to {LIMITS['side']} values, not {shape!r}")
        classes, latent, width = (_count(desc, k, LIMITS[k]) for k in ("classes", "latent", "width"))
        if classes * math.prod(shape) > LIMITS["values"] * 16:
            raise ValueError(f"{classes:,} classes of {math.prod(shape):,} values is more than a generator holds")
        if parameters(shape, classes, latent, width) > LIMITS["parameters"]:
            raise ValueError(f"it describes {parameters(shape, classes, latent, width):,} parameters, more than the "
                             f"{LIMITS['parameters']:,} a generator may hold")
        low, high = desc.get("low"), desc.get("high")
        if not all(type(v) in (int, float) and math.isfinite(float(v) if abs(v) < 1e308 else math.inf)
                   for v in (low, high)) or not low < high:
            raise ValueError(f"low and high must be finite numbers, low < high, not {low!r} and {high!r}")
        if not isinstance(desc.get("anchored", False), bool):
            raise ValueError(f"anchored must be true or false, not {desc['anchored']!r}")
    except (ValueError, OverflowError) as e:
        raise DfkdError(where, f"not a generator description ({e})") from None
    base = torch.full((classes, *shape), (low + high) / 2) if desc.get("anchored") else None
    return Generator(tuple(shape), classes, latent, width, float(low), float(high), base)
