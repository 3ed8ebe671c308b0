"""Reconstruction: deterministic shards, resume after a kill, NaN handling, bad settings."""
import importlib

import pytest
import torch

# the package exports the function dfkd.reconstruct, which shadows the module's attribute name
rec = importlib.import_module("dfkd.reconstruct")
from dfkd.checkpoint import load_tensors, read_json
from dfkd.config import ReconstructConfig
from dfkd.errors import DfkdError
from dfkd.reconstruct import load_synthetic, reconstruct

CFG = ReconstructConfig(objective="all-layers", n=30, batch_size=10, steps=8, jitter=1, progress=False)


def _shards(d):
    return [load_tensors(d / s["file"])[0] for s in read_json(d / "manifest.json")["shards"]]


def test_same_seed_same_shards_and_balanced(teacher, meta, tmp_path):
    reconstruct(teacher, meta, tmp_path / "a", CFG)
    reconstruct(teacher, meta, tmp_path / "b", CFG)
    for sa, sb in zip(_shards(tmp_path / "a"), _shards(tmp_path / "b")):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x, labels, logits = load_synthetic(tmp_path / "a")
    assert x.shape == (30, 1, 32, 32) and labels.bincount().tolist() == [3] * 10
    assert 0 <= x.min() and x.max() <= 1
    m = read_json(tmp_path / "a" / "manifest.json")
    assert m["complete"] and m["image_steps"] == 30 * 8
    assert all(s["loss_last"] < s["loss_first"] for s in m["shards"])
    assert (tmp_path / "a" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reconstruct(teacher, meta, tmp_path / "c", ReconstructConfig(**{**CFG.__dict__, "seed": 1}))
    assert not torch.equal(load_synthetic(tmp_path / "c")[0], x)


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
        load_synthetic(tmp_path / "resumed")
    monkeypatch.setattr(rec, "optimise_batch", real)
    calls.clear()
    reconstruct(teacher, meta, tmp_path / "resumed", CFG)
    for sa, sb in zip(_shards(tmp_path / "whole"), _shards(tmp_path / "resumed")):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_loss_stops_with_a_clear_error_and_keeps_shards(teacher, meta, tmp_path, monkeypatch):
    from dfkd.objectives import AllLayers
    real, seen = AllLayers.loss, []

    def nan_in_second_batch(self, logits, acts, tg):
        seen.append(1)
        out = real(self, logits, acts, tg)
        return out * float("nan") if len(seen) > CFG.steps else out

    monkeypatch.setattr(AllLayers, "loss", nan_in_second_batch)
    with pytest.raises(DfkdError, match="loss became nan at step 0; finished shards are kept"):
        reconstruct(teacher, meta, tmp_path / "n", CFG)
    assert [s["index"] for s in read_json(tmp_path / "n" / "manifest.json")["shards"]] == [0]


def test_other_settings_in_the_same_directory_are_refused(teacher, meta, tmp_path):
    reconstruct(teacher, meta, tmp_path / "d", CFG)
    with pytest.raises(DfkdError, match="other settings"):
        reconstruct(teacher, meta, tmp_path / "d", ReconstructConfig(**{**CFG.__dict__, "steps": 9}))


def test_noise_baseline_needs_no_stats(teacher, tmp_path):
    reconstruct(teacher, None, tmp_path / "z", ReconstructConfig(objective="noise", n=20, batch_size=20, progress=False))
    x, _, _ = load_synthetic(tmp_path / "z")
    assert abs(x.mean().item() - 0.15) < 0.01
