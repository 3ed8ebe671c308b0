"""The statistics file: round trips, and every kind of damage refused with one line."""
import json
import struct

import pytest
import torch

from dfkd.checkpoint import weights_sha256
from dfkd.errors import DfkdError
from dfkd.metadata import KINDS, load, save, summary


@pytest.fixture
def saved(meta, tmp_path):
    return save(meta, tmp_path / "t.stats.safetensors")


def _rewrite_header(path, fn):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    inner = json.loads(head["__metadata__"]["dfkd"])
    fn(inner)
    head["__metadata__"]["dfkd"] = json.dumps(inner)
    new = json.dumps(head).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_round_trip_is_bit_exact(meta, saved, teacher):
    back = load(saved, weights_sha256(teacher.state_dict()))
    assert set(back.tensors) == set(meta.tensors)
    for k, v in meta.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert back.kinds == list(KINDS) and back.num_classes == 10
    h = back.header
    assert h["recorded_on"]["n_samples"] == 6000 and sum(h["recorded_on"]["per_class"]) == 6000
    assert h["input_shape"] == [1, 32, 32] and [l["path"] for l in h["layers"]] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    # LeNet-5's first conv layer (4,704 units) is stored diagonal by default, the small fc layers full
    assert back.tensors["all_layers/conv1/std"].shape == (10, 4704)
    assert back.tensors["all_layers/fc1/chol"].shape == (10, 120, 120)


def test_sizes_add_up(meta, saved):
    s = summary(meta)
    assert s["total_bytes"] == sum(t.numel() * t.element_size() for t in meta.tensors.values())
    assert s["total_bytes"] < saved.stat().st_size < s["total_bytes"] + 20000
    assert s["train_bytes"] == 6000 * 784


def test_truncated_file_is_refused(saved):
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(DfkdError, match="truncated or corrupt"):
        load(saved)


def test_tampered_tensor_is_refused(saved):
    raw = bytearray(saved.read_bytes())
    raw[-5] ^= 0xFF
    saved.write_bytes(bytes(raw))
    with pytest.raises(DfkdError, match="altered|NaN"):
        load(saved)


def test_wrong_version_is_refused(saved):
    _rewrite_header(saved, lambda h: h.update(version=99))
    with pytest.raises(DfkdError, match="version 99 is not supported"):
        load(saved)


def test_header_that_disagrees_with_tensors_is_refused(saved):
    _rewrite_header(saved, lambda h: h["layers"][0].update(units=4703))
    with pytest.raises(DfkdError, match="shape"):
        load(saved)


def test_not_a_stats_file(tmp_path, teacher):
    from dfkd.checkpoint import save_tensors
    p = save_tensors(tmp_path / "w.safetensors", teacher.state_dict())
    with pytest.raises(DfkdError, match="no dfkd header"):
        load(p)


def test_other_teacher_is_refused_unless_allowed(saved):
    with pytest.raises(DfkdError, match="another teacher.*--allow-other-teacher"):
        load(saved, "0" * 64)
    assert load(saved, "0" * 64, allow_other_teacher=True).num_classes == 10


def test_missing_kind_names_the_record_command(teacher, small, tmp_path):
    from dfkd.record import record
    m = record(teacher, small, kinds=["top_layer"], progress=False)
    with pytest.raises(DfkdError, match="dfkd record --teacher T --kinds spectral_pairs"):
        m.require("spectral_pairs", "T")
