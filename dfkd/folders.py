"""Image folders (``--data folder:DIR``): ``DIR/train/<class>/*.png`` and ``DIR/test/<class>/...`` (or
class folders directly in DIR, training split only); images are read with Pillow when a batch needs
them, scaled to [0, 1] by their bit depth (16-bit greyscale PNGs and TIFFs divided by 65535; float
TIFFs, mode ``F``, read as they are and must hold values in 0..1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import DataInfo, DataSource, RawImages
from .errors import DfkdError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _pil_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a damaged or hostile file (SyntaxError: its parsers' "broken file")."""
    from PIL import Image
    return OSError, ValueError, SyntaxError, EOFError, ArithmeticError, Image.DecompressionBombError


# 16-bit greyscale as Pillow opens it (PNG, TIFF; "I": 32-bit integers, as older Pillow opens 16-bit PNGs)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _unit_floats(im, f: Path) -> np.ndarray:
    """A float (mode ``F``) image's values, which must be finite and lie in 0..1 (black..white): its
    raw values as they are (Pillow's own conversion to ``L`` truncates them, reading 0..1 as 0)."""
    a = np.asarray(im, dtype=np.float32)
    if a.size and not np.isfinite(a).all():
        raise DfkdError(f, "float (mode F) pixels include NaN or infinity; the folder's float images must hold "
                        "values in 0..1")
    if a.size and (float(a.min()) < 0 or float(a.max()) > 1):
        raise DfkdError(f, f"float (mode F) pixels range {float(a.min()):g}..{float(a.max()):g}; the folder's float "
                        "images must hold values in 0..1")
    return a


def _pixels(im, mode: str, f: Path) -> np.ndarray:
    """An image's pixels in its folder's mode: ``L`` or ``RGB`` (uint8), ``I;16`` (16-bit grey, read
    as uint16) or ``F`` (float grey in 0..1, read as float32). Bit depths are scaled, never clipped
    (Pillow's own conversion saturates 16-bit grey at 255 and truncates floats): 8-bit ``v``, 16-bit
    ``257 v`` and float ``v / 255`` are the same grey, ``v / 255``."""
    from PIL import Image
    if im.mode == "F":
        a = _unit_floats(im, f)
        if mode == "F":
            return a
        if mode == "I;16":
            return np.rint(a * 65535).astype(np.uint16)
        im = Image.fromarray(np.rint(a * 255).astype(np.uint8))
    elif im.mode in SIXTEEN_BIT:
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DfkdError(f, f"{im.mode} pixels outside 0..65535 (dfkd reads 8- and 16-bit images, and float "
                            "images in 0..1)")
        a = a.astype(np.uint16)
        if mode == "I;16":
            return a
        if mode == "F":
            return a.astype(np.float32) / 65535
        im = Image.fromarray(((a.astype(np.uint32) + 128) // 257).astype(np.uint8))
    elif mode == "I;16":
        return np.asarray(im.convert("L")).astype(np.uint16) * np.uint16(257)
    elif mode == "F":
        return np.asarray(im.convert("L")).astype(np.float32) / 255
    return np.asarray(im.convert(mode))


class _FolderImages:
    """Image files read (and converted to one mode) with Pillow when indexed by a batch."""

    def __init__(self, files: list[Path], mode: str, size: tuple[int, int]):
        self.files, self.mode, self.size = files, mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx) -> np.ndarray:
        from PIL import Image
        out = []
        for i in np.atleast_1d(idx):
            f = self.files[int(i)]
            try:
                with Image.open(f) as im:
                    arr = _pixels(im, self.mode, f)
            except _pil_errors() as e:
                raise DfkdError(f, f"cannot read this image ({e})") from None
            if arr.shape[:2] != self.size:
                raise DfkdError(f, f"is {arr.shape[1]}x{arr.shape[0]}, the others {self.size[1]}x{self.size[0]}")
            out.append(arr.reshape(*self.size, -1).transpose(2, 0, 1))
        return np.stack(out)


def folder_files(root: Path) -> list[Path]:
    """Every image an image folder's splits read, in the order they are read (train, then test)."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = [p.name for p in _class_folders(train_dir)]
    splits = [train_dir] + ([root / "test"] if (root / "test").is_dir() else [])
    return [f for split in splits for f in _folder_split(split, classes)[0]]


def _class_folders(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_split(d: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    files, labels = [], []
    for k, c in enumerate(classes):
        sub = d / c
        found = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if sub.is_dir() else []
        files += found
        labels += [k] * len(found)
    if not files:
        raise DfkdError(d, "holds no images (expected <class>/<image>.png folders)")
    return files, torch.tensor(labels, dtype=torch.long)


def folder_source(arg: str) -> DataSource:
    from PIL import Image
    root = Path(arg)
    if not root.is_dir():
        raise DfkdError(root, "not a directory")
    split_dirs = {s: root / s for s in ("train", "test") if (root / s).is_dir()}
    train_dir = split_dirs.get("train", root)
    classes = [p.name for p in _class_folders(train_dir)]
    if len(classes) < 2:
        raise DfkdError(train_dir, f"needs at least two class folders, found {len(classes)}")
    if "test" in split_dirs and [p.name for p in _class_folders(split_dirs["test"])] != classes:
        raise DfkdError(split_dirs["test"], "its class folders differ from the training split's")
    files, labels = _folder_split(train_dir, classes)
    try:
        with Image.open(files[0]) as im:
            mode = "I;16" if im.mode in SIXTEEN_BIT else "F" if im.mode == "F" else "L" if im.mode in ("1", "L") \
                else "RGB"
            size = (im.height, im.width)
    except _pil_errors() as e:
        raise DfkdError(files[0], f"cannot read this image ({e})") from None
    info = DataInfo(shape=(3 if mode == "RGB" else 1, *size), num_classes=len(classes), class_names=tuple(classes),
                    name=f"folder:{arg}")
    top = {"I;16": 65535.0, "F": 1.0}.get(mode, 255.0)  # the folder's white: its first image's bit depth
    train = RawImages(_FolderImages(files, mode, size), labels, info, top)
    test = None
    if "test" in split_dirs:
        tfiles, tlabels = _folder_split(split_dirs["test"], classes)
        test = RawImages(_FolderImages(tfiles, mode, size), tlabels, info, top)
    return DataSource(train, test, info)
