"""Write MNIST digits blended onto crops of real photographs, in the style of MNIST-M, as an image folder
dfkd reads with ``--data folder:OUT``: ``OUT/train/<digit>/*.png``, ``OUT/test/<digit>/*.png`` (32x32 RGB)
and ``OUT/crops.json``, where each image's background came from.

The photographs are 18 that scikit-image ships inside its wheel (``skimage/data``), read from the wheel
file itself (``make setup`` leaves it under ``.venv/share/dfkd/``; ``--wheel`` names another), so nothing
is installed or downloaded at run time; the drawings and test patterns among them are left out. Each
image is ``|crop - digit|`` per channel (MNIST-M's blend): a random 32x32 crop of a random photograph,
and the digit zero-padded to 32x32 in all three channels. The test split's backgrounds come from
photographs the training split never uses (and of other scenes), so a test image's background was never
seen in training.

    python examples/natural_digits.py OUT [--train N] [--test N] [--seed S] [--wheel FILE]
"""
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from colour_digits import parser, save_split  # examples/, beside this script
from dfkd.digits import mnist_arrays

# photographs (not drawings, text pages or test patterns), by their file name inside skimage/data
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
TEST_PHOTOS = ("cell.png", "coins.png", "ihc.png", "rocket.jpg")  # held out: only the test split's backgrounds
# come from these (the two motorcycle views, one scene, both stay in training)
SIDE = 32


def find_wheel(given: str | None) -> Path:
    if given:
        return Path(given)
    found = sorted((Path(sys.prefix) / "share" / "dfkd").glob("scikit_image-*.whl"))
    if not found:
        sys.exit("natural_digits: no scikit-image wheel under .venv/share/dfkd (make setup fetches it); "
                 "give one with --wheel")
    return found[-1]


def photographs(wheel: Path) -> dict[str, np.ndarray]:
    """The photographs as uint8 RGB arrays ``[H, W, 3]`` (a grey one in all three channels)."""
    with zipfile.ZipFile(wheel) as z:
        return {name: np.asarray(Image.open(io.BytesIO(z.read(f"skimage/data/{name}"))).convert("RGB"))
                for name in PHOTOS}


def blend(digits: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` digits on uint8 ``[N, 32, 32, 3]`` crops: ``|crop - digit|`` per channel."""
    d = np.pad(digits, ((0, 0), (2, 2), (2, 2))).astype(np.int16)[..., None]
    return np.abs(crops.astype(np.int16) - d).astype(np.uint8)


def draw(photos: dict[str, np.ndarray], names: tuple[str, ...], n: int, rng: np.random.Generator):
    """``n`` random 32x32 crops of the named photographs, and where each came from."""
    crops, where = np.empty((n, SIDE, SIDE, 3), np.uint8), []
    for i in range(n):
        name = names[rng.integers(len(names))]
        img = photos[name]
        top, left = int(rng.integers(img.shape[0] - SIDE + 1)), int(rng.integers(img.shape[1] - SIDE + 1))
        crops[i] = img[top:top + SIDE, left:left + SIDE]
        where.append([name, top, left])
    return crops, where


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--wheel", default=None, help="a scikit-image wheel file (default: the one make setup fetched)")
    a = p.parse_args()
    photos, arrays, rng = photographs(find_wheel(a.wheel)), mnist_arrays(), np.random.default_rng(a.seed)
    names = {"train": tuple(n for n in PHOTOS if n not in TEST_PHOTOS), "test": TEST_PHOTOS}
    record = {}
    for split, n in (("train", a.train), ("test", a.test)):
        crops, where = draw(photos, names[split], n, rng)
        save_split(a.out, split, blend(arrays[f"{split}_x"][:n], crops), arrays[f"{split}_y"][:n])
        record[split] = where
    (Path(a.out) / "crops.json").write_text(json.dumps(record))
    print(f"wrote {a.train} training and {a.test} test images to {a.out}")


if __name__ == "__main__":
    main()
