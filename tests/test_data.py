import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from dfkd.data import _from_hub_pickle, load_mnist, read_idx, restricted_unpickle, to_input
from dfkd.errors import DfkdError
from tests.conftest import write_idx


def test_mnist_shapes_labels_and_checksums(mnist):
    assert mnist.train_x.shape == (60000, 28, 28) and mnist.train_x.dtype == torch.uint8
    assert mnist.test_x.shape == (10000, 28, 28)
    # the official MNIST label counts
    assert mnist.train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.test_y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert int(mnist.train_x.max()) == 255 and int(mnist.train_x.min()) == 0
    # pixel checksums (golden; MNIST's mean intensity 0.1307 is the published figure)
    assert int(mnist.test_x.long().sum()) == 264_923_200
    assert int(mnist.train_x.long().sum()) == 1_567_298_545
    assert abs(mnist.train_x.double().mean().item() / 255 - 0.1307) < 5e-4


def test_pixels_equal_the_pickle_values(mnist):
    from dfkd.data import _hub_pickle
    raw = gzip.decompress(_hub_pickle().read_bytes())
    (trx, _), _, (tex, _) = restricted_unpickle(raw)
    assert np.array_equal(mnist.train_x[:50000].numpy().reshape(50000, -1).astype(np.float64) / 256,
                          trx.astype(np.float64))
    assert np.array_equal(mnist.test_x.numpy().reshape(10000, -1) / 256.0, tex.astype(np.float64))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code():
    with pytest.raises(DfkdError, match="refused global"):
        restricted_unpickle(pickle.dumps(_Evil()))
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(restricted_unpickle(pickle.dumps(arr, protocol=4)), arr)


def test_tampered_hub_pickle_is_refused(tmp_path):
    p = tmp_path / "mnist.pkl.gz"
    p.write_bytes(gzip.compress(pickle.dumps(_Evil(), protocol=2)))
    with pytest.raises(DfkdError, match="refused global posix.system|refused global os.system|refused global nt"):
        _from_hub_pickle(p)


def test_idx_directory_reads_real_images(idx_dir, mnist):
    d = load_mnist(idx_dir)
    assert torch.equal(d.train_x, mnist.train_x[:2000]) and torch.equal(d.test_y, mnist.test_y[:500])


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


def test_idx_count_mismatch_and_missing(tmp_path, idx_dir):
    for f in idx_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(499))
    with pytest.raises(DfkdError, match="500 images but 499 labels"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DfkdError, match="no t10k-labels"):
        load_mnist(tmp_path)


def test_to_input_pads_for_lenet(mnist):
    x = to_input(mnist.test_x[:4], (1, 32, 32))
    assert x.shape == (4, 1, 32, 32)
    assert torch.equal(x[:, 0, 2:30, 2:30], mnist.test_x[:4].float() / 255)
    assert x[:, :, :2].abs().sum() == 0
    with pytest.raises(DfkdError, match="do not fit"):
        to_input(mnist.test_x[:4], (1, 27, 27))
