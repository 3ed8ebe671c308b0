"""Reconstruction: deterministic shards, resume after a kill, NaN handling, bad settings, the
teacher's input space honoured, and the synthetic set read back."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import dfkd.reconstruction as rec
from dfkd.config import ReconstructConfig
from dfkd.data import DataInfo
from dfkd.errors import DfkdError
from dfkd.files import load_tensors, read_json, write_json
from dfkd.images import class_grid
from dfkd.reconstruction import reconstruct
from dfkd.synthetic import SyntheticSet

CFG = ReconstructConfig(objective="all-layers", n=30, batch_size=10, steps=8, jitter=1, progress=False)


def _shards(d):
    return [load_tensors(d / s["file"])[0] for s in read_json(d / "manifest.json")["shards"]]


def _load(d):
    return SyntheticSet(d).open().load()


def test_same_seed_same_shards_and_balanced(teacher, meta, tmp_path):
    reconstruct(teacher, meta, tmp_path / "a", CFG)
    reconstruct(teacher, meta, tmp_path / "b", CFG)
    a, b = _shards(tmp_path / "a"), _shards(tmp_path / "b")
    assert len(a) == len(b) == 3  # 30 inputs in batches of 10
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, labels, logits = _load(tmp_path / "a")
    assert x.shape == (30, 1, 32, 32) and labels.bincount().tolist() == [3] * 10
    assert 0 <= x.min() and x.max() <= 1
    m = read_json(tmp_path / "a" / "manifest.json")
    assert m["complete"] and m["image_steps"] == 30 * 8 and m["data"]["shape"] == [1, 32, 32]
    assert all(s["loss_last"] < s["loss_first"] for s in m["shards"])
    reconstruct(teacher, meta, tmp_path / "c", replace(CFG, seed=1))
    assert not torch.equal(_load(tmp_path / "c")[0], x)


def test_sample_grid_is_the_class_grid(teacher, meta, tmp_path):
    from PIL import Image
    reconstruct(teacher, meta, tmp_path / "a", CFG)
    x, labels, _ = _load(tmp_path / "a")  # 30 inputs: all of them fit in the grid's ten a class
    png = np.array(Image.open(tmp_path / "a" / "samples.png"))
    assert np.array_equal(png, class_grid(x, labels))
    assert png.shape == (10 * 34 * 2 + 4, 10 * 34 * 2 + 4)


def test_kill_and_resume_equals_uninterrupted(teacher, meta, tmp_path, monkeypatch):
    reconstruct(teacher, meta, tmp_path / "whole", CFG)
    real, calls = rec.optimise_batch, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rec, "optimise_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(teacher, meta, tmp_path / "resumed", CFG)
    m = read_json(tmp_path / "resumed" / "manifest.json")
    assert [s["index"] for s in m["shards"]] == [0] and not m["complete"]
    with pytest.raises(DfkdError, match="incomplete"):
        _load(tmp_path / "resumed")
    monkeypatch.setattr(rec, "optimise_batch", real)
    reconstruct(teacher, meta, tmp_path / "resumed", CFG)
    whole, resumed = _shards(tmp_path / "whole"), _shards(tmp_path / "resumed")
    assert len(whole) == len(resumed) == 3  # the resumed run finished the set, not only its first shard
    for sa, sb in zip(whole, resumed):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_loss_stops_with_a_clear_error_and_keeps_shards(teacher, meta, tmp_path, monkeypatch):
    from dfkd.objectives import AllLayers
    real, seen = AllLayers.loss, []

    def nan_in_second_batch(self, *args):
        seen.append(1)
        out = real(self, *args)
        return out * float("nan") if len(seen) > CFG.steps else out

    monkeypatch.setattr(AllLayers, "loss", nan_in_second_batch)
    with pytest.raises(DfkdError, match="loss became nan at step 0; finished shards are kept"):
        reconstruct(teacher, meta, tmp_path / "n", CFG)
    assert [s["index"] for s in read_json(tmp_path / "n" / "manifest.json")["shards"]] == [0]


def test_other_settings_in_the_same_directory_are_refused(teacher, meta, tmp_path):
    reconstruct(teacher, meta, tmp_path / "d", CFG)
    with pytest.raises(DfkdError, match="other settings"):
        reconstruct(teacher, meta, tmp_path / "d", replace(CFG, steps=9))


def test_noise_baseline_needs_no_stats_nor_attributes(teacher, small, tmp_path):
    """The class count comes from the model's output, the shape and range from the data description."""
    reconstruct(teacher, None, tmp_path / "z", ReconstructConfig(objective="noise", n=20, batch_size=20,
                                                                progress=False), small.info)
    x, labels, _ = _load(tmp_path / "z")
    assert abs(x.mean().item() - 0.15) < 0.01 and labels.tolist() == [i % 10 for i in range(20)]
    with pytest.raises(DfkdError, match="give the data description"):
        reconstruct(teacher, None, tmp_path / "y", ReconstructConfig(objective="noise", progress=False))


def test_inputs_live_in_the_teachers_normalised_space(teacher, meta, tmp_path):
    """With mean/std normalisation the start is N(0.15, 0.1) in raw values and the clamp is the raw
    range [0, 1], mapped into the model's space."""
    info = replace(meta.data, mean=(0.5,), std=(0.25,))
    meta.header["data"] = info.as_dict()
    try:
        reconstruct(teacher, meta, tmp_path / "n", replace(CFG, lr=0.5))
        z = reconstruct(teacher, None, tmp_path / "z", ReconstructConfig(objective="noise", n=10, batch_size=10,
                                                                        progress=False), info)
    finally:
        meta.header["data"] = replace(info, mean=(0.0,), std=(1.0,)).as_dict()
    x, _, _ = _load(tmp_path / "n")
    assert x.min() >= -2 - 1e-6 and x.max() <= 2 + 1e-6 and (x <= -2 + 1e-6).any()  # raw 0 is -2 here
    xz, _, _ = _load(z.parent)
    raw = info.to_raw(xz)
    assert abs(raw.mean().item() - 0.15) < 0.01 and abs(raw.std().item() - 0.1) < 0.01


def test_malformed_manifests_are_one_line(tmp_path, teacher, meta):
    reconstruct(teacher, meta, tmp_path / "s", CFG)
    m = read_json(tmp_path / "s" / "manifest.json")
    for bad in ({k: v for k, v in m.items() if k != "shards"}, dict(m, shards="x"),
                dict(m, shards=[dict(m["shards"][0], file="../../etc/passwd")])):
        write_json(tmp_path / "s" / "manifest.json", bad)
        with pytest.raises(DfkdError, match="shards list is missing or malformed"):
            SyntheticSet(tmp_path / "s").open()
    with pytest.raises(DfkdError, match="not a synthetic set folder"):
        SyntheticSet(tmp_path / "nothing").open()


def test_vectors_as_inputs(tmp_path):
    """A non-image model (an MLP on 7 features) reconstructs too: no jitter or TV on vectors."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    info = DataInfo((7,), 3, low=-3.0, high=3.0)
    from dfkd.config import RecordConfig
    from dfkd.recording import record
    x, y = torch.randn(600, 7), torch.arange(600) % 3
    meta = record(net, (x, y), RecordConfig(progress=False), info)
    reconstruct(net, meta, tmp_path / "v", ReconstructConfig(objective="all-layers", n=30, batch_size=15, steps=20,
                                                             jitter=2, tv=0.1, progress=False))
    xs, _, _ = _load(tmp_path / "v")
    assert xs.shape == (30, 7) and xs.min() >= -3 and xs.max() <= 3
