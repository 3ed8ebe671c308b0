"""The views a student is distilled on: a batch of raw images (the range's low end is black) transformed at random, per
sample where it can be; the teacher labels the result, so a mixed view needs no mixed label. Distillation
(on a synthetic set) and generation (on a generator's stream) use the same views, and reconstruction and the
generator's training may show the teacher the inputs being made under them (``seen``). Inputs that are not
images ``[N, C, H, W]`` pass through every view but ``+mix`` unchanged; ``dfkd distill`` and ``dfkd run`` refuse
image views typed for such inputs instead of letting them pass (``require_images``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DfkdError

BASES, MIXES = ("shift", "affine", "none"), ("mix", "cutmix")  # the views, then what is mixed into them
AUGMENTS = tuple(b + m + c + d for b in BASES for m in ("", *(f"+{m}" for m in MIXES)) for c in ("", "+colour")
                 for d in ("", "+backdrop"))
AUGMENT_FORM = "shift, affine or none, then optionally +mix or +cutmix, +colour and +backdrop, in that order"
SEEN = tuple(b + c for b in BASES for c in ("", "+colour"))  # what a teacher may see of an input being made
SEEN_FORM = "shift, affine or none, optionally +colour (nothing mixed: each input keeps its own label)"


def require_images(how: str, shape: tuple[int, ...]) -> None:
    """Refuse views ``how`` (``AUGMENTS``) that act on images alone (a base view, ``+cutmix``, ``+colour``,
    ``+backdrop``) for inputs of ``shape`` (one input's) that are not images ``[C, H, W]``: they would pass
    through unchanged. ``none`` and ``none+mix`` (mixup mixes vectors too) are taken by any input."""
    base, *rest = how.split("+")
    if (base != "none" or set(rest) - {"mix"}) and len(shape) != 3:
        raise DfkdError("augment", f"{how} needs images [C, H, W]; these inputs are {tuple(shape)} "
                        "(vectors take none or none+mix)")


def cutmix(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each sample gets one box from its partner in the reversed batch: side ``sqrt(1 - lam)`` of the
    image's, ``lam ~ U(0, 1)`` per sample, centred uniformly (clipped at the borders)."""
    n, h, w = len(x), x.shape[2], x.shape[3]
    lam = torch.rand(n, generator=g)
    bh, bw = (h * (1 - lam).sqrt()).round().long(), (w * (1 - lam).sqrt()).round().long()
    cy, cx = (torch.rand(n, generator=g) * h).long(), (torch.rand(n, generator=g) * w).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= (cy - bh // 2).view(-1, 1, 1)) & (rows < (cy - bh // 2 + bh).view(-1, 1, 1))
           & (cols >= (cx - bw // 2).view(-1, 1, 1)) & (cols < (cx - bw // 2 + bw).view(-1, 1, 1)))
    return torch.where(box[:, None].to(x.device), x.flip(0), x)


def recolour(x: torch.Tensor, g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Per-sample colour jitter: an RGB image's three channels in a random order, then each channel with a
    random gain (0.6 to 1.4) and offset (+-10 % of the range ``[lo, hi]``), clamped to that range (a grey
    image becomes a tinted one; other channel counts keep their order: brightness and contrast per channel)."""
    n, c = x.shape[:2]
    order = torch.argsort(torch.rand(n, c, generator=g), 1).to(x.device)
    if c == 3:
        x = torch.gather(x, 1, order.view(n, c, *[1] * (x.dim() - 2)).expand_as(x))
    gain = (0.6 + 0.8 * torch.rand(n, c, *[1] * (x.dim() - 2), generator=g)).to(x)
    offset = ((torch.rand(n, c, *[1] * (x.dim() - 2), generator=g) * 2 - 1) * 0.1 * (hi - lo)).to(x)
    return (x * gain + offset).clamp(lo, hi)


def backdrops(n: int, c: int, h: int, w: int, g: torch.Generator, leaves: int = 48) -> torch.Tensor:
    """``n`` procedural backgrounds ``[n, c, h, w]`` in ``[0, 1]``, made from no data: a dead-leaves image
    (``leaves`` discs painted over each other, radii drawn from ``p(r) ~ r^-3`` between two pixels and the
    image's side: flat regions with sharp edges and a 1/f-like spectrum; each disc a random brightness with
    a weaker random tint, as photographs' colours mostly are), plus ``1/f^a`` noise (``a ~ U(1, 2)``) of
    random contrast for texture."""
    side, small = max(h, w), 2.0
    r = 1 / (1 / small ** 2 - torch.rand(n, leaves, generator=g) * (1 / small ** 2 - 1 / side ** 2)).sqrt()
    cy, cx = torch.rand(n, leaves, generator=g) * h, torch.rand(n, leaves, generator=g) * w
    rows, cols = torch.arange(h).view(1, 1, h, 1) + 0.5, torch.arange(w).view(1, 1, 1, w) + 0.5
    top = torch.zeros(n, h, w, dtype=torch.long)  # the last disc painted over each pixel; 0: none (the ground)
    for k in range(leaves):  # one disc at a time: memory of one image batch, whatever the count
        inside = (rows[0] - cy[:, k, None, None]) ** 2 + (cols[0] - cx[:, k, None, None]) ** 2 <= r[:, k, None, None] ** 2
        top = torch.where(inside, k + 1, top)
    tint = (torch.rand(n, leaves + 1, c, generator=g) - 0.5) * 0.6 * torch.rand(n, leaves + 1, 1, generator=g)
    colours = (torch.rand(n, leaves + 1, 1, generator=g) + tint).clamp(0, 1)  # index 0: the ground
    leaf = torch.gather(colours, 1, top.view(n, -1, 1).expand(-1, -1, c)).view(n, h, w, c).permute(0, 3, 1, 2)
    fy, fx = torch.fft.fftfreq(h).view(h, 1), torch.fft.rfftfreq(w).view(1, -1)
    f = (fy ** 2 + fx ** 2).sqrt().clamp_min(1 / side)
    spectrum = torch.complex(torch.randn(n, c, *f.shape, generator=g), torch.randn(n, c, *f.shape, generator=g))
    noise = torch.fft.irfft2(spectrum * f ** -(1 + torch.rand(n, 1, 1, 1, generator=g)), s=(h, w))
    noise = (noise - noise.mean((2, 3), keepdim=True)) / noise.std((2, 3), keepdim=True).clamp_min(1e-8)
    return (leaf + noise * 0.15 * torch.rand(n, 1, 1, 1, generator=g)).clamp(0, 1)


def backdrop(x: torch.Tensor, g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Each image with probability one half composited onto a procedural background (``backdrops``, scaled to the raw
    range ``[lo, hi]``), half of those by the difference ``|x - b|`` (MNIST-M's blend), the rest by a mean
    weighted ``w x + (1 - w) b``, ``w ~ U(0.5, 0.9)``: the student sees the teacher's answer on cluttered
    scenes that the reconstructed inputs, each drawn against a plain ground, never show."""
    n = len(x)
    b = (lo + (hi - lo) * backdrops(n, x.shape[1], x.shape[2], x.shape[3], g)).to(x)
    on, diff = (torch.rand(n, generator=g) < 0.5).to(x.device), (torch.rand(n, generator=g) < 0.5).to(x.device)
    wt = (0.5 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)).to(x)
    blended = torch.where(diff.view(-1, 1, 1, 1), lo + (x - b).abs(), wt * x + (1 - wt) * b)
    return torch.where(on.view(-1, 1, 1, 1), blended.clamp(lo, hi), x)


def augment(x: torch.Tensor, how: str, g: torch.Generator, pad: int = 2, lo: float = 0.0,
            hi: float = 1.0) -> torch.Tensor:
    """Augment a batch of raw images (``lo`` is black): ``shift`` translates the whole batch by up
    to ``pad`` pixels (filled with ``lo``); ``affine`` gives every sample its own random rotation
    (+-15 degrees), scale (0.9 to 1.1) and translation (+-``pad`` pixels), bilinear, filled with ``lo``;
    then ``+mix`` mixes each sample with its partner in the reversed batch (``lam ~ U(0, 1)`` per
    sample; vectors too) and ``+cutmix`` pastes a box of the partner into it (``cutmix``); last,
    ``+colour`` jitters each image's colours within the raw range ``[lo, hi]`` (``recolour``). The
    teacher labels the result, so mixed views need no mixed labels."""
    base, *rest = how.split("+")
    mix = next((m for m in rest if m in MIXES), "")
    if x.dim() == 4 and base == "affine":
        n, h = len(x), x.shape[2]
        ang = (torch.rand(n, generator=g) * 2 - 1) * (math.pi / 12)
        scale = 1 / (0.9 + 0.2 * torch.rand(n, generator=g))
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * pad / h)
        cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        x = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo
    elif x.dim() == 4 and base == "shift":
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
        x = F.pad(x, (pad, pad, pad, pad), value=lo)[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    if mix == "mix":
        lam = torch.rand((len(x), *[1] * (x.dim() - 1)), generator=g).to(x.device)
        x = lam * x + (1 - lam) * x.flip(0)
    elif mix == "cutmix" and x.dim() == 4:
        x = cutmix(x, g)
    if "colour" in rest and x.dim() == 4:
        x = recolour(x, g, lo, hi)
    if "backdrop" in rest and x.dim() == 4:
        x = backdrop(x, g, lo, hi)
    return x


def seen(x: torch.Tensor, how: str, g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """What the teacher sees of raw inputs being made (``SEEN``: ``augment`` without a mix), differentiable in
    ``x``; ``none`` is ``x`` itself, with nothing drawn from ``g``. Inputs made under the views the student
    will be distilled on keep their class under them, instead of hiding it in detail a resampling or a colour
    change wipes out (Plug-In Inversion, Ghiasi et al. 2022)."""
    return x if how == "none" else augment(x, how, g, lo=lo, hi=hi)


def jitter(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """DeepInversion's jitter: a batch of images rolled by one random shift of up to ``pixels`` each way (drawn
    from ``g``); anything else, or ``pixels`` 0, as it is (and nothing drawn)."""
    if not pixels or x.dim() != 4:
        return x
    dy, dx = torch.randint(-pixels, pixels + 1, (2,), generator=g).tolist()
    return torch.roll(x, (dy, dx), (2, 3))
