"""Data sources (bundled MNIST, IDX, image folders, npz arrays), normalisation and streaming."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from dfkd.data import DataInfo, as_batches, fit_shape
from dfkd.sources import channel_moments
from dfkd.digits import from_hub_pickle, hub_pickle_bytes, mnist_arrays, read_idx, restricted_unpickle
from dfkd.errors import DfkdError
from dfkd.sources import open_data
from tests.conftest import write_idx


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
