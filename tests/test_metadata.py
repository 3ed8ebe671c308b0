"""The statistics file: round trips, and every kind of damage refused with one line."""
import json
import struct

import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.files import weights_sha256
from dfkd.metadata import KINDS, contract, load, save, summary


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
    assert set(back.tensors) == set(meta.tensors) == set(contract(back.header))
    for k, v in meta.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert back.kinds == list(KINDS) and back.num_classes == 10
    h = back.header
    assert h["recorded_on"]["n_samples"] == 6000 and sum(h["recorded_on"]["per_class"]) == 6000
    assert back.data.shape == (1, 32, 32) and [l["path"] for l in h["layers"]] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    # LeNet-5's first conv layer per unit (4,704) is stored diagonal by default, the small fc layers full
    assert back.get("all-layers", "std", "conv1").shape == (10, 4704)
    assert back.get("all-layers", "chol", "fc1").shape == (10, 120, 120)
    assert set(back.gaussian("all-layers", "fc1")) == {"mean", "chol"}


def test_every_kind_alone_stores_exactly_its_contract(teacher, small):
    from dfkd.config import RecordConfig
    from dfkd.recording import record
    for kind in KINDS:
        m = record(teacher, (small.train[0][:1000], small.train[1][:1000]), RecordConfig(kinds=(kind,)))
        assert {k: tuple(v.shape) for k, v in m.tensors.items()} == contract(m.header)
        assert all(k == "count" or k.startswith(kind + "/") for k in m.tensors)


def test_sizes_add_up(meta, saved):
    s = summary(meta)
    assert s["total_bytes"] == sum(t.numel() * t.element_size() for t in meta.tensors.values())
    assert s["total_bytes"] < saved.stat().st_size < s["total_bytes"] + 20000
    assert s["train_bytes"] == 6000 * 32 * 32


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
    _rewrite_header(saved, lambda h: h["layers"][0].update(dim=4703))
    with pytest.raises(DfkdError, match="shape"):
        load(saved)


def test_not_a_stats_file(tmp_path, teacher):
    from dfkd.files import save_tensors
    p = save_tensors(tmp_path / "w.safetensors", teacher.state_dict())
    with pytest.raises(DfkdError, match="no dfkd header"):
        load(p)


def test_other_teacher_is_refused_unless_allowed(saved):
    with pytest.raises(DfkdError, match="another teacher.*--allow-other-teacher"):
        load(saved, "0" * 64)
    assert load(saved, "0" * 64, allow_other_teacher=True).num_classes == 10


def test_missing_kind_names_the_record_command(teacher, small, tmp_path):
    from dfkd.config import RecordConfig
    from dfkd.recording import record
    m = record(teacher, small.train, RecordConfig(kinds=("top-layer",)))
    with pytest.raises(DfkdError, match="dfkd record --teacher T --kinds spectral-pairs"):
        m.require("spectral-pairs", "T")
