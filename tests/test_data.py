"""Data sources (bundled MNIST, IDX, image folders, npz arrays), normalisation and streaming."""
import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd.data import DataInfo, as_batches, fit_shape
from dfkd.sources import channel_moments
from dfkd.digits import from_hub_pickle, hub_pickle_bytes, mnist_arrays, read_idx, restricted_unpickle
from dfkd.errors import DfkdError
from dfkd.sources import data_sha256, open_data
from dfkd.cli import main
from tests.conftest import ROOT, write_idx


def test_mnist_shapes_labels_and_checksums(mnist):
    a = mnist_arrays()
    assert a["train_x"].shape == (60000, 28, 28) and a["train_x"].dtype == np.uint8
    assert a["test_x"].shape == (10000, 28, 28)
    # the official MNIST label counts
    assert np.bincount(a["train_y"]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(a["test_y"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert a["train_y"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    # pixel checksums (golden; MNIST's mean intensity 0.1307 is the published figure)
    assert int(a["test_x"].astype(np.int64).sum()) == 264_923_200
    assert int(a["train_x"].astype(np.int64).sum()) == 1_567_298_545
    assert mnist.info.shape == (1, 28, 28) and mnist.info.num_classes == 10 and len(mnist.train) == 60000
    x, y = next(as_batches(mnist.train, 60000))
    assert abs(x.double().mean().item() - 0.1307) < 5e-4 and torch.equal(y, torch.from_numpy(a["train_y"]))


def test_pixels_equal_the_pickle_values():
    raw, _ = hub_pickle_bytes()
    (trx, _), _, (tex, _) = restricted_unpickle(gzip.decompress(raw))
    a = mnist_arrays()
    assert np.array_equal(a["train_x"][:50000].reshape(50000, -1).astype(np.float64) / 256, trx.astype(np.float64))
    assert np.array_equal(a["test_x"].reshape(10000, -1) / 256.0, tex.astype(np.float64))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code():
    with pytest.raises(DfkdError, match="refused global"):
        restricted_unpickle(pickle.dumps(_Evil()))
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(restricted_unpickle(pickle.dumps(arr, protocol=4)), arr)
    with pytest.raises(DfkdError, match="refused global posix.system|refused global os.system|refused global nt"):
        from_hub_pickle(gzip.compress(pickle.dumps(_Evil(), protocol=2)), "evil.pkl.gz")


def test_idx_source_reads_real_images(idx_dir):
    d = open_data(f"idx:{idx_dir}")
    a = mnist_arrays()
    x, y = next(as_batches(d.train, 2000))
    assert torch.equal(x[:, 0], torch.from_numpy(a["train_x"][:2000]).float() / 255)
    assert len(d.test) == 500 and d.info.name == f"idx:{idx_dir}"


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-7], "size mismatch"),
    (lambda b: b"\0\0\x09\x03" + b[4:], "bad magic"),
    (lambda b: b[:2], "bad magic"),
])
def test_idx_reader_refuses_broken_files(tmp_path, damage, message):
    good = tmp_path / "good"
    write_idx(good, np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256)
    assert read_idx(good).shape == (2, 28, 28)
    bad = tmp_path / "bad"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(DfkdError, match=message):
        read_idx(bad)


def test_fit_shape_pads_for_lenet():
    raw = torch.rand(4, 28, 28)
    x = fit_shape(raw, (1, 32, 32))
    assert x.shape == (4, 1, 32, 32) and torch.equal(x[:, 0, 2:30, 2:30], raw) and x[:, :, :2].abs().sum() == 0
    with pytest.raises(DfkdError, match="do not fit"):
        fit_shape(raw, (1, 27, 27))


def test_folder_source_reads_colour_images_as_pillow_does(colour_dir):
    from PIL import Image
    d = open_data(f"folder:{colour_dir}")
    assert d.info.shape == (3, 32, 32) and d.info.class_names == tuple(str(i) for i in range(10))
    assert len(d.train) == 1200 and len(d.test) == 300
    x, y = next(as_batches(d.train, 5, torch.tensor([0, 1, 2, 1199, 600])))
    f = d.train.images.files[1199]
    oracle = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(x[3], oracle) and int(y[3]) == int(f.parent.name)
    labels = d.train.labels
    assert labels.bincount().tolist() == np.bincount(mnist_arrays()["train_y"][:1200]).tolist()


def test_folder_of_16_bit_pngs_reads_as_the_8_bit_folder_scaled(tmp_path):
    """16-bit greyscale PNGs are scaled by 65535, not saturated at 255 (which made every pixel above
    255/65535 white): a folder of 257 v reads as the 8-bit folder of v, float for float; so does a
    folder mixing the two depths, whichever comes first."""
    from PIL import Image
    v = np.random.default_rng(0).integers(0, 256, size=(2, 3, 6, 5), dtype=np.uint8)

    def write(name, depth):  # depth(class, image) -> 8 or 16
        for c in range(2):
            (tmp_path / name / f"c{c}").mkdir(parents=True)
            for i in range(3):
                a = v[c, i] if depth(c, i) == 8 else v[c, i].astype(np.uint16) * 257
                Image.fromarray(a).save(tmp_path / name / f"c{c}" / f"{i}.png")

    write("eight", lambda c, i: 8)
    write("sixteen", lambda c, i: 16)
    write("mixed16", lambda c, i: 16 if i == 0 else 8)
    write("mixed8", lambda c, i: 8 if i == 0 else 16)
    assert Image.open(tmp_path / "sixteen" / "c0" / "0.png").mode == "I;16"
    x8, y8 = next(as_batches(open_data(f"folder:{tmp_path / 'eight'}").train, 6))
    assert torch.equal(x8[:, 0], torch.from_numpy(v.reshape(6, 6, 5)).float() / 255)
    for name in ("sixteen", "mixed16", "mixed8"):
        d = open_data(f"folder:{tmp_path / name}")
        x, y = next(as_batches(d.train, 6))
        assert d.info.shape == (1, 6, 5) and torch.equal(x, x8) and torch.equal(y, y8), name
    # a grey between 8-bit steps keeps its value
    (tmp_path / "fine" / "a").mkdir(parents=True)
    (tmp_path / "fine" / "b").mkdir()
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "fine" / "a" / "0.png")
    Image.fromarray(np.full((4, 4), 1, np.uint16)).save(tmp_path / "fine" / "b" / "0.png")
    x, _ = next(as_batches(open_data(f"folder:{tmp_path / 'fine'}").train, 2))
    assert torch.equal(x[:, 0, 0, 0], torch.tensor([40000.0, 1.0]) / 65535)


def test_folder_of_float_tiffs_reads_their_values(tmp_path):
    """Float (mode F) TIFFs in 0..1 read as they are, not truncated to 0 by Pillow's F -> L conversion:
    a folder of ``v / 255`` reads as the 8-bit folder of ``v``, also mixed with 8-bit PNGs either way
    round, and a value between 8-bit steps keeps it. Floats outside 0..1 or not finite, and 32-bit
    integer (mode I) images above 65535, are refused in one line naming the file."""
    from PIL import Image
    v = np.random.default_rng(1).integers(0, 256, size=(2, 3, 6, 5), dtype=np.uint8)

    def write(name, kind):  # kind(class, image) -> "F" (a float TIFF) or "L" (an 8-bit PNG)
        for c in range(2):
            (tmp_path / name / f"c{c}").mkdir(parents=True)
            for i in range(3):
                if kind(c, i) == "F":
                    Image.fromarray(v[c, i].astype(np.float32) / np.float32(255)).save(tmp_path / name / f"c{c}" / f"{i}.tif")
                else:
                    Image.fromarray(v[c, i]).save(tmp_path / name / f"c{c}" / f"{i}.png")

    write("eight", lambda c, i: "L")
    write("float", lambda c, i: "F")
    write("mixedF", lambda c, i: "F" if i == 0 else "L")
    write("mixed8", lambda c, i: "L" if i == 0 else "F")
    assert Image.open(tmp_path / "float" / "c0" / "0.tif").mode == "F"
    x8, y8 = next(as_batches(open_data(f"folder:{tmp_path / 'eight'}").train, 6))
    assert x8.abs().sum() > 0
    for name in ("float", "mixedF", "mixed8"):
        d = open_data(f"folder:{tmp_path / name}")
        x, y = next(as_batches(d.train, 6))
        assert d.info.shape == (1, 6, 5) and torch.equal(y, y8), name
        assert torch.allclose(x, x8, rtol=0, atol=1e-7), (name, (x - x8).abs().max())

    def folder(name, a, b):  # two one-image classes, each a TIFF of Pillow's writing
        for c, arr in (("a", a), ("b", b)):
            (tmp_path / name / c).mkdir(parents=True)
            Image.fromarray(arr).save(tmp_path / name / c / "0.tif")
        return f"folder:{tmp_path / name}"

    fine = np.full((4, 4), 0.3, np.float32)
    x, _ = next(as_batches(open_data(folder("fine", fine, np.full((4, 4), 1.0, np.float32))).train, 2))
    assert torch.equal(x[:, 0, 0, 0], torch.tensor([np.float32(0.3), 1.0]))
    for name, bad, words in [("big", np.linspace(0, 2, 16, dtype=np.float32).reshape(4, 4), "range 0..2;"),
                             ("nan", np.full((4, 4), np.nan, np.float32), "NaN"),
                             ("neg", np.full((4, 4), -0.5, np.float32), "range -0.5..-0.5")]:
        with pytest.raises(DfkdError, match="must hold values in 0..1") as e:
            next(as_batches(open_data(folder(name, fine, bad)).train, 2))
        assert words in str(e.value) and "0.tif" in str(e.value) and "\n" not in str(e.value), name
    wide = np.full((4, 4), 70000, np.int32)
    path = folder("wide", np.full((4, 4), 100, np.int32), wide)
    assert Image.open(tmp_path / "wide" / "b" / "0.tif").mode.startswith("I")
    with pytest.raises(DfkdError, match="outside 0..65535"):
        next(as_batches(open_data(path).train, 2))


def test_normalisation_auto_is_the_channel_moments(colour_dir):
    d = open_data(f"folder:{colour_dir}", normalize="auto")
    raw = torch.cat([b[0] for b in as_batches(open_data(f"folder:{colour_dir}").train, 500)]).double()
    mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3), unbiased=False)
    assert torch.allclose(torch.tensor(d.info.mean, dtype=torch.float64), mean, atol=1e-6)
    assert torch.allclose(torch.tensor(d.info.std, dtype=torch.float64), std, atol=1e-6)
    x, _ = next(as_batches(d.train, 1200))  # raw: normalised at the call into the network
    x = d.info.to_model(x)
    assert torch.allclose(x.double().mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    info = d.info
    assert torch.allclose(info.to_raw(info.to_model(raw[:4].float())), raw[:4].float(), atol=1e-6)
    clamped = info.clamp(torch.full((2, 3, 32, 32), 100.0))
    assert torch.allclose(clamped, torch.ones(2, 3, 32, 32), atol=1e-5)  # the raw range
    with pytest.raises(DfkdError, match="normalize"):
        open_data(f"folder:{colour_dir}", normalize="0.5,0.5/0.2,0.2")


@pytest.mark.parametrize("compress", [False, True])
def test_npz_source_matches_its_arrays(tmp_path, compress):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (300, 12, 12, 3), dtype=np.uint8), rng.integers(0, 4, 300)
    xt, yt = rng.integers(0, 256, (50, 12, 12, 3), dtype=np.uint8), rng.integers(0, 4, 50)
    path = tmp_path / "d.npz"
    (np.savez_compressed if compress else np.savez)(path, x=x, y=y, x_test=xt, y_test=yt)
    d = open_data(f"npz:{path}")
    assert d.info.shape == (3, 12, 12) and d.info.num_classes == 4
    idx = torch.tensor([5, 299, 0])
    xb, yb = next(as_batches(d.train, 3, idx))
    assert torch.equal(xb, torch.from_numpy(x[idx.numpy()]).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(yb, torch.from_numpy(y[idx.numpy()]))
    assert len(d.test) == 50
    f = tmp_path / "f.npz"
    np.savez(f, x=rng.normal(size=(40, 7)).astype(np.float32), y=np.arange(40) % 2)
    v = open_data(f"npz:{f}")
    assert v.info.shape == (7,) and v.test is None and v.info.low < 0 < v.info.high
    with pytest.raises(DfkdError, match="needs arrays x and y"):
        np.savez(tmp_path / "g.npz", images=x)
        open_data(f"npz:{tmp_path / 'g.npz'}")


def test_any_dataset_or_dataloader_streams(mnist):
    from torch.utils.data import DataLoader, TensorDataset
    x, y = torch.rand(10, 1, 4, 4), torch.arange(10) % 3
    for data in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=4), (x, y)):
        got = list(as_batches(data, 4))
        assert [len(b[1]) for b in got] == [4, 4, 2]
        assert torch.equal(torch.cat([b[0] for b in got]), x)
    mean, std = channel_moments((x, y))
    assert abs(mean[0] - x.double().mean().item()) < 1e-9 and abs(std[0] - x.double().std(unbiased=False).item()) < 1e-9


def test_data_info_round_trip_and_checks():
    info = DataInfo((3, 8, 8), 5, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), class_names=tuple("abcde"))
    assert DataInfo.from_dict(info.as_dict(), "x") == info
    with pytest.raises(DfkdError, match="std must be > 0"):
        DataInfo.from_dict(dict(info.as_dict(), std=[0, 1, 1]), "x")
    with pytest.raises(DfkdError, match="bad data description"):
        DataInfo.from_dict({"shape": "nope"}, "x")


def _cifar_dir(root: Path, n: int = 20, keys=str, inner: bool = True) -> tuple[Path, dict]:
    """A CIFAR-10 python folder in the archive's format, written here: five training batches and a test
    batch of ``n`` random images each (dicts pickled at protocol 2, keys ``str`` as Python 2 wrote them, or
    ``bytes``) and ``batches.meta``; returns the folder given to ``cifar10:`` and the arrays written."""
    folder = root / "cifar-10-batches-py" if inner else root
    folder.mkdir(parents=True)
    g, k = np.random.default_rng(0), (lambda s: s if keys is str else s.encode())
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = g.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in g.integers(0, 10, n)]
        written[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({k("batch_label"): name, k("labels"): y, k("data"): x,
                         k("filenames"): [f"{name}_{i}.png" for i in range(n)]}, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({k("num_cases_per_batch"): n, k("label_names"): names, k("num_vis"): 3072}, f, protocol=2)
    return root, written


@pytest.mark.parametrize("keys", [str, bytes])
def test_cifar10_source_reads_the_python_batches(tmp_path, keys):
    """Each image is its row of the batch file: the red, green and blue 32x32 planes in that order, over 255;
    the labels and class names are the files'; the content hash covers every batch."""
    root, written = _cifar_dir(tmp_path / "c", keys=keys)
    d = open_data(f"cifar10:{root}")
    assert d.info.shape == (3, 32, 32) and d.info.class_names[0] == "airplane" and d.info.class_names[9] == "truck"
    assert len(d.train) == 100 and len(d.test) == 20
    x, y = d.train.batch(torch.arange(100))
    want = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(x, torch.from_numpy(want.astype(np.float32) / 255).view(100, 3, 32, 32))
    assert float(x[21, 1, 0, 0]) * 255 == pytest.approx(float(want[21, 1024]))  # batch 2 image 1, green, pixel 0
    assert y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    xt, yt = d.test.batch(torch.arange(20))
    assert torch.equal(xt * 255, torch.from_numpy(written["test_batch"][0].astype(np.float32)).view(20, 3, 32, 32))
    h = data_sha256(f"cifar10:{root}")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"")  # any batch changed: another sha256
    assert data_sha256(f"cifar10:{root}") != h


def test_cifar10_source_refuses_tampered_or_malformed_batches(tmp_path, capsys):
    """A pickle that would run code, a missing batch, and a batch of the wrong shape or labels: each one line
    naming the file, and nothing is run."""
    root, written = _cifar_dir(tmp_path / "c", inner=False)
    ran = tmp_path / "ran"
    (root / "data_batch_2").write_bytes(pickle.dumps(_Touch(str(ran)), protocol=2))
    with pytest.raises(DfkdError, match="unsafe or corrupt pickle") as e:
        open_data(f"cifar10:{root}")
    assert str(e.value.where) == str(root / "data_batch_2") and not ran.exists()
    (root / "data_batch_2").unlink()
    with pytest.raises(DfkdError, match="data_batch_2 missing"):
        open_data(f"cifar10:{root}")
    for bad, why in (({"data": written["test_batch"][0][:, :100], "labels": written["test_batch"][1]}, "uint8 array"),
                     ({"data": written["test_batch"][0], "labels": [11] * 20}, r"labels must lie in \[0, 9\]"),
                     ({"data": written["test_batch"][0], "labels": [1] * 19}, "20 images but 19 labels"),
                     ({"labels": [1] * 20}, "holds no 'data'")):
        (root / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=2))
        with pytest.raises(DfkdError, match=why):
            open_data(f"cifar10:{root}")
    assert main(["train", "--data", f"cifar10:{tmp_path / 'nowhere'}", "--epochs", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line


class _Touch:
    """Unpickling it would create a file: the proof that a refused pickle ran nothing."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_natural_digits_are_mnist_digits_blended_on_crops_of_the_wheels_photographs(tmp_path):
    """examples/natural_digits.py as a user runs it: every image is |crop - digit| for the crop crops.json names,
    recomputed here from the wheel's photograph and MNIST's digit; the test split's backgrounds come only from
    photographs the training split never uses; dfkd reads the folder as 10 classes of 32x32 RGB."""
    wheels = sorted((Path(sys.prefix) / "share" / "dfkd").glob("scikit_image-*.whl"))
    assert wheels, "make setup (and make test) fetch the scikit-image wheel into .venv/share/dfkd"
    out = tmp_path / "natural"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "natural_digits.py"), str(out), "--train", "60",
                        "--test", "100"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    crops, a = json.loads((out / "crops.json").read_text()), mnist_arrays()
    z = zipfile.ZipFile(wheels[-1])
    photo = {}
    for split, n in (("train", 60), ("test", 100)):
        for k in range(n):
            name, top, left = crops[split][k]
            if name not in photo:
                photo[name] = np.asarray(Image.open(io.BytesIO(z.read(f"skimage/data/{name}"))).convert("RGB"))
            bg = photo[name][top:top + 32, left:left + 32].astype(int)
            digit = np.pad(a[f"{split}_x"][k], 2).astype(int)[..., None]
            y = int(a[f"{split}_y"][k])
            got = np.asarray(Image.open(out / split / str(y) / f"{k:05d}.png"))
            assert got.shape == (32, 32, 3) and np.array_equal(got, np.abs(bg - digit)), (split, k)
    assert not {c[0] for c in crops["train"]} & {c[0] for c in crops["test"]}
    d = open_data(f"folder:{out}")
    assert d.info.shape == (3, 32, 32) and d.info.num_classes == 10 and len(d.train) == 60 and len(d.test) == 100


# --- pickles as Python 2 wrote CIFAR-10's, and crafted ones, opcode by opcode ---------------------------
def _op_str(s: str | bytes) -> bytes:  # Python 2's str: SHORT_BINSTRING / BINSTRING
    b = s.encode("latin-1") if isinstance(s, str) else s
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + len(b).to_bytes(4, "little")) + b


def _op_int(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_dtype(name: str, state: bytes = b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb") -> bytes:
    return _op_global("numpy", "dtype") + _op_str(name) + b"K\x00K\x01\x87R" + state


def _op_array(shape: tuple[int, ...], raw: bytes, dtype: bytes | None = None, build: bool = True) -> bytes:
    p = _op_global("numpy.core.multiarray", "_reconstruct") + _op_global("numpy", "ndarray") + b"K\x00\x85" \
        + _op_str("b") + b"\x87R"
    if build:
        p += b"(K\x01(" + b"".join(_op_int(d) for d in shape) + b"t" + (dtype or _op_dtype("u1")) + b"\x89" \
            + _op_str(raw) + b"tb"
    return p


def _py2_batch(x: np.ndarray, labels: list[int] | bytes) -> bytes:
    """A batch dict pickled at protocol 2 as Python 2's cPickle wrote CIFAR-10: str keys, the data a str."""
    lab = labels if isinstance(labels, bytes) else b"](" + b"".join(_op_int(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + _op_str("batch_label") + _op_str("training batch 1 of 5") + _op_str("labels") + lab
            + _op_str("data") + _op_array(x.shape, x.tobytes()) + b"u.")


def test_a_python2_batch_reads_as_cifar10s_own_files_do(tmp_path):
    """The real files' format (Python 2 str keys, the pixels one str): keys come out as str, the data a uint8
    array equal to the bytes written, through the whole source."""
    root, written = _cifar_dir(tmp_path / "c", inner=False)
    x, y = written["data_batch_4"]
    (root / "data_batch_4").write_bytes(_py2_batch(x, y))
    d = restricted_unpickle((root / "data_batch_4").read_bytes())
    assert set(d) == {"batch_label", "labels", "data"} and d["data"].dtype == np.uint8
    assert np.array_equal(d["data"], x) and d["labels"] == y
    src = open_data(f"cifar10:{root}")
    assert torch.equal(src.train.batch(torch.arange(60, 80))[0] * 255,
                       torch.from_numpy(x.astype(np.float32)).view(20, 3, 32, 32))


def test_crafted_pickles_are_refused_before_any_array_or_memory_exists(tmp_path):
    """What numpy's own callables would accept and a file must not get: a dtype holding object pointers (or
    fields), an array with no data behind its shape, a direct ndarray call claiming 3 GB, a codec other than
    latin-1, labels that are not a list of ints (floats, strings, a list of lists sharing themselves)."""
    x = np.zeros((2, 3072), np.uint8)
    pointers = b"(K\x03U\x01|N(U\x01aNtq\x00}q\x01U\x01a(" + _op_dtype("O", b"") + b"K\x00tsJ\x08\x00\x00\x00J\x01\x00\x00\x00K\x00tb"
    bombs = {
        "object dtype": b"\x80\x02" + _op_array((2,), b"A" * 16, _op_dtype("O")) + b".",
        "fields": b"\x80\x02" + _op_array((2,), b"A" * 16, _op_dtype("V8", pointers)) + b".",
        "fields state": b"\x80\x02" + _op_array((2,), b"A" * 16, _op_dtype(
            "u1", pointers.replace(_op_dtype("O", b""), _op_dtype("u1", b"")))) + b".",  # fields of plain bytes
        "no data": b"\x80\x02" + _op_array((10 ** 6, 3072), b"", build=False) + b".",
        "short data": b"\x80\x02" + _op_array((10 ** 6, 3072), b"\x07") + b".",
        "ndarray call": b"\x80\x02" + _op_global("numpy", "ndarray") + b"(J\x40\x42\x0f\x00M\x00\x0ct" + _op_str("B")
                        + b"\x86R.",
        "codec": b"\x80\x02" + _op_global("_codecs", "encode") + b"X\x02\x00\x00\x00eJX\x04\x00\x00\x00zlib\x86R.",
    }
    why = {"object dtype": "refused dtype 'O'", "fields": "refused dtype 'V8'", "fields state": "fields, sub-arrays",
           "no data": "without its data", "short data": "whose data is not", "ndarray call": "direct numpy.ndarray",
           "codec": "_codecs.encode with 'zlib'"}
    for what, raw in bombs.items():
        with pytest.raises(DfkdError, match="unsafe or corrupt pickle") as e:
            restricted_unpickle(raw, what)
        assert why[what] in str(e.value), (what, str(e.value))
    root, _ = _cifar_dir(tmp_path / "c", inner=False)
    shared = b"K\x00q\x000" + b"".join(b"](h" + bytes([i]) + b"h" + bytes([i]) + b"eq" + bytes([i + 1]) + b"0"
                                      for i in range(40)) + b"h" + bytes([40])
    for labels, why in (([1.5, 2.0], "list of integers"), (b"](" + _op_str("3") + _op_str("4") + b"e", "list of integers"),
                        (shared, "list of integers")):
        raw = _py2_batch(x, labels) if isinstance(labels, bytes) else pickle.dumps({"data": x, "labels": labels}, 2)
        (root / "data_batch_1").write_bytes(raw)
        with pytest.raises(DfkdError, match=why):
            open_data(f"cifar10:{root}")
