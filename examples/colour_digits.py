"""Write MNIST digits colourised and padded to 32x32 RGB as an image folder dfkd reads with
``--data folder:OUT``: ``OUT/train/<digit>/*.png`` and ``OUT/test/<digit>/*.png``.

Each digit gets its own random foreground and background colour (the stroke blends from one
to the other with the pixel's intensity), so colour carries no class information.

    python examples/colour_digits.py OUT [--train N] [--test N] [--seed S]
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dfkd.digits import mnist_arrays


def colourise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` digits to uint8 ``[N, 32, 32, 3]``: random colours, zero-padded to 32."""
    a = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float32)[..., None] / 255.0
    fg = rng.uniform(0.5, 1.0, (len(x), 1, 1, 3)).astype(np.float32)
    bg = rng.uniform(0.0, 0.35, (len(x), 1, 1, 3)).astype(np.float32)
    return np.rint(255 * (a * fg + (1 - a) * bg)).astype(np.uint8)


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags of a script that writes MNIST's first N digits, made over, as an image folder."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=10000, help="training images (the first N of MNIST's)")
    p.add_argument("--test", type=int, default=2000, help="test images (the first N)")
    p.add_argument("--seed", type=int, default=0)
    return p


def save_split(out: str, split: str, imgs: np.ndarray, labels: np.ndarray) -> None:
    """``OUT/<split>/<digit>/<k>.png`` for each image ``k``."""
    for k, (img, y) in enumerate(zip(imgs, labels)):
        d = Path(out) / split / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{k:05d}.png")


def main() -> None:
    a = parser(__doc__).parse_args()
    arrays, rng = mnist_arrays(), np.random.default_rng(a.seed)
    for split, n in (("train", a.train), ("test", a.test)):
        save_split(a.out, split, colourise(arrays[f"{split}_x"][:n], rng), arrays[f"{split}_y"][:n])
    print(f"wrote {a.train} training and {a.test} test images to {a.out}")


if __name__ == "__main__":
    main()
