"""What a resume may trust: every resume state and shard bound to a sha256 (one flipped bit is refused
in one line and nothing is overwritten), every resumable verb bound to its settings (a resume or a
finished output of other settings is refused, or with --restart made again), and no non-finite
loss or weights ever saved."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dfkd.training as training
from dfkd.cli import main
from dfkd.config import DistillConfig, ReconstructConfig, RecordConfig, TrainConfig
from dfkd.results import write_results
from dfkd.errors import OtherSettings
from dfkd.resume import (canonical, check_finished, config_settings, differences, load_checked, load_state, refusal,
                         save_checked, save_state)
from dfkd.run_config import RunConfig
from dfkd.synthetic import SyntheticSet
from tests.bad_cases_resume import changed_idx


def flip(path: Path, mask: int = 0x01, at: int | None = None) -> None:
    """One bit of ``path`` flipped: by default the lowest bit of its middle byte (in the tensors'
    data, and a float stays finite: exactly the damage a loader without a checksum takes as valid)."""
    b = bytearray(path.read_bytes())
    b[len(b) // 2 if at is None else at] ^= mask
    path.write_bytes(bytes(b))


def outcome(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def check_one_line(code: int, err: str, needles) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dfkd: "), (code, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def train_argv(w, t: Path, *more) -> list:
    return ["train", "--data", w.data, "--epochs", "2", "--batch-size", "500", "--out", t, "--name", "prev",
            "--quiet", *more]


@contextmanager
def interrupted_after_first_epoch(monkeypatch):
    """The second epoch's evaluation raises KeyboardInterrupt: the run stops with the first epoch's
    resume state written, as a kill during the second epoch leaves it."""
    real, calls = training.accuracy, []

    def accuracy(m, test):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(m, test)

    with monkeypatch.context() as m:
        m.setattr(training, "accuracy", accuracy)
        yield


def state_of(t: Path) -> Path:
    (state,) = list(t.glob("prev.state*"))
    return state


def weights(stem: Path) -> dict:
    return load_file(stem.with_name(stem.name + ".safetensors"))


# --- checksums --------------------------------------------------------------------------------
def test_a_flipped_bit_in_a_resume_state_is_refused_and_restart_starts_over(world, tmp_path, capsys, monkeypatch):
    with interrupted_after_first_epoch(monkeypatch):
        assert main([str(a) for a in train_argv(world, tmp_path)]) == 130
    state = state_of(tmp_path)
    flip(state)
    damaged = state.read_bytes()
    code, err = outcome(train_argv(world, tmp_path), capsys)
    check_one_line(code, err, [state.name, "damaged (sha256 mismatch)", "delete it", "--restart"])
    assert state.read_bytes() == damaged and not (tmp_path / "prev.safetensors").exists()
    # --restart: the damaged state is discarded; the result is an uninterrupted run's, bit for bit
    assert main([str(a) for a in train_argv(world, tmp_path, "--restart")]) == 0
    assert main([str(a) for a in train_argv(world, tmp_path / "whole")]) == 0
    assert not state.exists()
    a, b = weights(tmp_path / "prev"), weights(tmp_path / "whole" / "prev")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _exp_avg_sq(state: Path) -> tuple[str, int]:
    """The name and the file offset of the first element of Adam's second moment in a state file."""
    raw = state.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in sorted(header) if k.endswith("/exp_avg_sq"))
    return name, 8 + n + header[name]["data_offsets"][0]


def test_a_sign_flip_in_adams_state_is_refused_and_never_saves_nan(world, tmp_path, capsys, monkeypatch):
    """The sign bit of one of Adam's second moments: refused as damaged. The same state with its
    sha256 recomputed (a state that passes the check but diverges) stops at the first NaN loss,
    saves nothing and keeps the state."""
    with interrupted_after_first_epoch(monkeypatch):
        assert main([str(a) for a in train_argv(world, tmp_path)]) == 130
    state = state_of(tmp_path)
    good = state.read_bytes()
    name, at = _exp_avg_sq(state)
    flip(state, 0x80, at + 3)  # little-endian float32: the sign is the top bit of the fourth byte
    code, err = outcome(train_argv(world, tmp_path), capsys)
    check_one_line(code, err, [state.name, "damaged (sha256 mismatch)"])

    state.write_bytes(good)
    tensors, body = load_checked(state, "")
    tensors[name] = -tensors[name].abs() - 1  # every second moment negative: sqrt gives NaN
    save_checked(state, tensors, body)
    resealed = state.read_bytes()
    code, err = outcome(train_argv(world, tmp_path), capsys)
    check_one_line(code, err, ["--lr", "NaN", "at epoch 2", "nothing was saved after epoch 1, whose resume state "
                               "is kept"])
    assert state.read_bytes() == resealed
    assert not (tmp_path / "prev.safetensors").exists() and not (tmp_path / "prev.json").exists()


def test_a_flipped_bit_in_a_shard_is_refused_by_distill_and_by_a_resume(world, tmp_path, capsys):
    syn = tmp_path / "syn"
    shutil.copytree(world.synthetic, syn)
    shard = syn / "shard-00000.safetensors"
    original = shard.read_bytes()
    rec = ["reconstruct", "--teacher", world.teacher, "--objective", "spectral-pairs", "--images", "20",
           "--batch-size", "10", "--steps", "2", "--out", syn, "--quiet"]  # the world's own settings
    assert main([str(a) for a in rec]) == 0 and shard.read_bytes() == original  # intact: resumed, nothing redone
    flip(shard)
    damaged = shard.read_bytes()
    code, err = outcome(["distill", "--synthetic", syn, "--out", tmp_path / "student", "--epochs", "1", "--quiet"],
                        capsys)
    check_one_line(code, err, ["shard-00000.safetensors", "damaged (sha256 mismatch)", "dfkd reconstruct"])
    assert not list(tmp_path.glob("student*"))
    code, err = outcome(rec, capsys)  # a resume verifies the shards it finds
    check_one_line(code, err, ["shard-00000.safetensors", "damaged (sha256 mismatch)", "--restart"])
    assert shard.read_bytes() == damaged
    assert main([str(a) for a in rec + ["--restart"]]) == 0  # the damaged shard made again, the same bytes
    assert shard.read_bytes() == original


# --- settings ---------------------------------------------------------------------------------
def test_train_again_with_other_settings_is_refused_or_restarted(world, tmp_path, capsys):
    once = train_argv(world, tmp_path, "--epochs", "1")
    assert main([str(a) for a in once]) == 0
    files = {p: p.read_bytes() for p in (tmp_path / "prev.safetensors", tmp_path / "prev.json")}
    made = json.loads(files[tmp_path / "prev.json"])["settings"]  # the refusal names what differs, for its callers
    with pytest.raises(OtherSettings) as e:
        check_finished(tmp_path / "prev", dict(made, config=dict(made["config"], lr=0.002, epochs=2)))
    assert e.value.differing == (("epochs", 1, 2), ("lr", 0.001, 0.002)) and \
        "epochs 1 -> 2, lr 0.001 -> 0.002" in e.value.problem
    other_data = changed_idx(world, tmp_path / "idx")
    for more, words in ((["--lr", "0.002"], ["lr 0.001 -> 0.002"]), (["--epochs", "2"], ["epochs 1 -> 2"]),
                        (["--data", f"idx:{other_data}"], ["content_sha256"]), (["--seed", "1"], ["seed 0 -> 1"]),
                        (["--model", "lenet5-half"], ["lenet5 -> lenet5-half"])):
        code, err = outcome(once + more, capsys)
        check_one_line(code, err, ["prev.json", "finished model made with other settings", *words, "--restart"])
        assert all(p.read_bytes() == b for p, b in files.items())
    # what does not change the result is not compared: the finished model is kept, nothing redone
    mtime = (tmp_path / "prev.safetensors").stat().st_mtime_ns
    assert main([str(a) for a in once if a != "--quiet"] + ["--device", "cpu"]) == 0
    assert (tmp_path / "prev.safetensors").stat().st_mtime_ns == mtime
    assert all(p.read_bytes() == b for p, b in files.items())
    assert main([str(a) for a in once + ["--lr", "0.002", "--restart"]]) == 0
    desc = json.loads((tmp_path / "prev.json").read_text())
    assert desc["settings"]["config"]["lr"] == 0.002 and desc["train_config"]["lr"] == 0.002


def test_a_resume_with_other_settings_is_refused(world, tmp_path, capsys, monkeypatch):
    with interrupted_after_first_epoch(monkeypatch):
        assert main([str(a) for a in train_argv(world, tmp_path)]) == 130
    state = state_of(tmp_path)
    before = state.read_bytes()
    code, err = outcome(train_argv(world, tmp_path, "--epochs", "3"), capsys)
    check_one_line(code, err, [state.name, "cannot resume", "other settings", "epochs 2 -> 3", "--restart"])
    assert state.read_bytes() == before and not (tmp_path / "prev.safetensors").exists()
    assert main([str(a) for a in train_argv(world, tmp_path, "--epochs", "3", "--restart")]) == 0
    assert [h["epoch"] for h in json.loads((tmp_path / "prev.json").read_text())["history"]] == [1, 2, 3]


def test_distill_again_with_other_settings_is_refused_or_restarted(world, tmp_path, capsys):
    base = ["distill", "--synthetic", world.synthetic, "--teacher", world.teacher, "--out", tmp_path / "prev",
            "--epochs", "1", "--quiet"]
    assert main([str(a) for a in base]) == 0
    before = (tmp_path / "prev.safetensors").read_bytes()
    for more, words in ((["--temperature", "4"], ["temperature 8.0 -> 4.0"]), (["--augment", "none"], ["augment"]),
                        (["--student", "lenet5"], ["lenet5-half -> lenet5"])):
        code, err = outcome(base + more, capsys)
        check_one_line(code, err, ["prev.json", "other settings", *words, "--restart"])
        assert (tmp_path / "prev.safetensors").read_bytes() == before
    assert main([str(a) for a in base + ["--temperature", "4", "--restart"]]) == 0
    assert json.loads((tmp_path / "prev.json").read_text())["distill_config"]["temperature"] == 4.0


def test_run_resumed_with_other_settings_is_refused_or_restarted(world, tmp_path, capsys):
    base = ["run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer", "--no-baselines",
            "--images", "20", "--steps", "2", "--data", world.data, "--out", tmp_path / "prev", "--quiet"]
    assert main([str(a) for a in base]) == 0
    capsys.readouterr()
    d = tmp_path / "prev" / "lenet5"
    teacher = (d / "teacher.safetensors").read_bytes()
    student = (d / "students" / "top-layer.safetensors").read_bytes()
    for more, words in ((["--epochs", "2"], ["epochs 1 -> 2"]),
                        (["--images", "30"], ["n (--images) 20 -> 30", "give the settings it was made with"])):
        code, err = outcome(base + more, capsys)
        check_one_line(code, err, ["top-layer.json", "other settings", *words, "--restart"])
        assert (d / "students" / "top-layer.safetensors").read_bytes() == student
    code, err = outcome(base + ["--seed", "1"], capsys)  # the run's own teacher follows the seed
    check_one_line(code, err, ["teacher.json", "other settings", "seed 0 -> 1", "--restart"])
    assert main([str(a) for a in base + ["--epochs", "2", "--restart"]]) == 0
    assert (d / "teacher.safetensors").read_bytes() == teacher  # only what differs is made again
    desc = json.loads((d / "students" / "top-layer.json").read_text())
    assert desc["settings"]["config"]["epochs"] == 2 and desc["distill_config"]["epochs"] == 2
    assert not list(d.rglob("state/*"))  # no resume state left once a stage is saved
    again = base + ["--epochs", "2"]
    for stem in (d / "students" / "top-layer", d / "teacher"):  # a damaged model is never kept
        w = stem.with_name(stem.name + ".safetensors")
        good = w.read_bytes()
        flip(w)
        code, err = outcome(again, capsys)
        check_one_line(code, err, [w.name, "sha256 mismatch", "--restart"])
        w.write_bytes(good)
    assert main([str(a) for a in again]) == 0
    stats = (d / "teacher.stats.safetensors").read_bytes()
    code, err = outcome(again + ["--conv-stats", "channel"], capsys)  # statistics recorded per unit
    check_one_line(code, err, ["teacher.stats.safetensors", "other settings", "conv_stats unit -> channel",
                               "--restart"])
    assert (d / "teacher.stats.safetensors").read_bytes() == stats
    assert main([str(a) for a in again + ["--conv-stats", "channel", "--restart"]]) == 0
    from dfkd.metadata import load as load_stats
    assert {l["stat"] for l in load_stats(d / "teacher.stats.safetensors").header["layers"]
            if l["type"] == "conv"} == {"channel"}
    assert (d / "teacher.safetensors").read_bytes() == teacher  # the teacher kept, its statistics redone
    desc2 = json.loads((d / "students" / "top-layer.json").read_text())
    assert desc2["settings"]["stats_sha256"] != desc["settings"]["stats_sha256"]  # the student made again


# --- non-finite training ----------------------------------------------------------------------
def test_a_huge_lr_stops_at_the_first_nonfinite_loss_and_saves_nothing(world, tmp_path, capsys):
    code, err = outcome(train_argv(world, tmp_path, "--lr", "1e30"), capsys)
    line = check_one_line(code, err, ["--lr", "the loss became", "at epoch 1, step", "nothing was saved",
                                      "try a smaller --lr"])
    assert "NaN" in line or "infinite" in line
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # (but the lock file)


def test_a_resume_state_of_other_settings_names_what_differs(tmp_path):
    """A half-made stage's state, refused for other settings, says which (the colour hint reads them)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    settings = {"verb": "distill", "config": {"augment": "affine+cutmix+colour", "lr": 0.01}}
    save_state(tmp_path / "s.state.safetensors", net, opt, 1, [{"epoch": 1}], settings)
    other = {"verb": "distill", "config": {"augment": "affine+cutmix", "lr": 0.01}}
    with pytest.raises(OtherSettings) as e:
        load_state(tmp_path / "s.state.safetensors", net, opt, other)
    assert e.value.differing == (("augment", "affine+cutmix+colour", "affine+cutmix"),)
    assert "cannot resume: written by a run with other settings (augment" in e.value.problem
    assert load_state(tmp_path / "s.state.safetensors", net, opt, settings)[0] == 1


def test_settings_ignore_how_a_run_runs():
    a, b = RunConfig(device="cpu", progress=True), RunConfig(device="cuda", progress=False)
    assert config_settings(a) == config_settings(b) and "device" not in config_settings(a)
    # the stages' configs hold what they make only: how a stage runs is its Runtime, never in its settings
    assert not {"device", "progress", "rank", "world_size"} & {f.name for c in (TrainConfig, RecordConfig,
                                                                             ReconstructConfig, DistillConfig)
                                                                 for f in fields(c)}
    assert config_settings(DistillConfig(lr=1e-3)) != config_settings(DistillConfig(lr=2e-3))
    assert differences({"config": {"lr": 0.001, "epochs": 2}}, {"config": {"lr": 0.01, "epochs": 2}}) \
        == "lr 0.001 -> 0.01"
    e = refusal("f", "made with", {"config": {"lr": 0.001, "n": 2, "epochs": 2}}, {"config": {"lr": 0.01, "n": 3,
                                                                                          "epochs": 2}}, "go on")
    assert e.problem == "made with other settings (lr 0.001 -> 0.01, n (--images) 2 -> 3); go on" and \
        e.differing == (("lr", 0.001, 0.01), ("n", 2, 3))
    again = pickle.loads(pickle.dumps(e))  # rebuilt as it was made
    assert type(again) is OtherSettings and (again.where, again.problem, again.differing) == \
        (e.where, e.problem, e.differing)
    # work saved before a setting was added lacks it, and was made under its default (not "null")
    old, new = config_settings(TrainConfig()), config_settings(TrainConfig(augment="shift"))
    assert "augment" not in old and differences({"config": old}, {"config": new}) == "augment none -> shift"


def test_a_refusal_names_what_the_exact_comparison_saw():
    """The callers compare saved settings exactly; where they differ only in a setting one side lacks and the
    other holds at its later default (a hand-made file: ``to_dict`` leaves such a setting out), or as a null,
    the refusal names that setting with the lacking side absent, never an empty list."""
    saved, asked = {"config": {"lr": 0.001, "augment": "none"}}, {"config": {"lr": 0.001}}
    assert canonical(saved) != canonical(asked) and differences(saved, asked) == ""  # refused, yet equal by default
    e = refusal("f", "made with", saved, asked, "go on")
    assert e.problem == "made with other settings (augment none -> absent); go on" and \
        e.differing == (("augment", "none", None),)
    e = refusal("f", "made with", {"config": {"lr": 1, "x": None}}, {"config": {"lr": 1}}, "go on")
    assert e.problem == "made with other settings (x null -> absent); go on" and e.differing == (("x", None, None),)
    e = refusal("f", "made with", {"config": {"lr": 1}}, {"config": {"lr": 1, "x": None}}, "go on")  # saved lacks
    assert e.problem == "made with other settings (x absent -> null); go on" and e.differing == (("x", None, None),)
    e = refusal("f", "made with", {"config": {"lr": 1}}, {"config": {"lr": 2, "augment": "none", "foo": 3}}, "go on")
    assert e.problem == "made with other settings (foo absent -> 3, lr 1 -> 2); go on"  # a later default still reads


# --- what a finished model and its data are -------------------------------------------------------
def _npz(path: Path, shift_from: int | None = None) -> Path:
    """128 training and 32 test images (uint8, 0..255); ``shift_from``: the same file but for every
    row from that one on (same size, same range)."""
    import numpy as np
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (128, 28, 28), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = 0, 255
    if shift_from is not None:
        x[shift_from:, 5:, 5:] = 255 - x[shift_from:, 5:, 5:]
    y = np.arange(128) % 10
    np.savez(path, x=x, y=y, x_test=x[:32], y_test=y[:32])
    return path


def test_data_changed_in_place_is_refused_and_a_moved_copy_is_the_same(world, tmp_path, capsys, monkeypatch):
    """The data's settings are its content (every byte of its files), not its path: a file changed
    from row 64 on is refused by a resume and by a finished model; the same file moved is accepted."""
    data = _npz(tmp_path / "data.npz")
    argv = ["train", "--data", f"npz:{data}", "--epochs", "2", "--batch-size", "64", "--out", tmp_path / "o",
            "--name", "prev", "--quiet"]
    with interrupted_after_first_epoch(monkeypatch):
        assert main([str(a) for a in argv]) == 130
    state = tmp_path / "o" / "prev.state.safetensors"
    before = state.read_bytes()
    original = data.read_bytes()
    _npz(data, shift_from=64)
    assert data.stat().st_size == len(original) and data.read_bytes() != original
    code, err = outcome(argv, capsys)
    check_one_line(code, err, ["prev.state.safetensors", "cannot resume", "other settings", "content_sha256",
                               "--restart"])
    assert state.read_bytes() == before and not (tmp_path / "o" / "prev.json").exists()
    data.write_bytes(original)
    assert main([str(a) for a in argv]) == 0  # resumed, finished
    files = {p: p.read_bytes() for p in (tmp_path / "o" / "prev.safetensors", tmp_path / "o" / "prev.json")}
    _npz(data, shift_from=64)
    code, err = outcome(argv, capsys)
    check_one_line(code, err, ["prev.json", "finished model made with other settings", "content_sha256", "--restart"])
    moved = tmp_path / "elsewhere" / "copy.npz"
    moved.parent.mkdir()
    moved.write_bytes(original)
    mtime = (tmp_path / "o" / "prev.safetensors").stat().st_mtime_ns
    assert main([str(a) for a in argv[:2]] + [f"npz:{moved}"] + [str(a) for a in argv[3:]]) == 0  # kept
    assert (tmp_path / "o" / "prev.safetensors").stat().st_mtime_ns == mtime
    assert all(p.read_bytes() == b for p, b in files.items())


def test_data_sha256_is_the_content_not_the_path(world, tmp_path):
    from dfkd.sources import data_sha256
    copy = shutil.copytree(world.idx, tmp_path / "copy")
    assert data_sha256(f"idx:{copy}") == data_sha256(world.data)
    assert data_sha256(f"idx:{changed_idx(world, tmp_path / 'other')}") != data_sha256(world.data)
    assert data_sha256(None) is None


def _killed(argv: list, at: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", DFKD_TEST_CRASH_AT=at)
    r = subprocess.run([sys.executable, "-m", "dfkd", *map(str, argv)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == -9, (r.returncode, r.stderr)


def test_a_kill_between_weights_and_json_never_passes_for_the_old_model(world, tmp_path, capsys):
    """B (--restart --lr 0.01) killed right after its weights replaced A's: B's weights, A's JSON,
    B's resume state. Rerunning A is refused (the weights are not the JSON's), B's state kept;
    rerunning B saves B again from its state (nothing redone), and the model loads."""
    from dfkd.checkpoint import load_model
    a = train_argv(world, tmp_path)
    assert main([str(x) for x in a]) == 0
    _killed(a + ["--restart", "--lr", "0.01"], "1+@prev.safetensors")
    state = tmp_path / "prev.state.safetensors"
    assert state.is_file()
    kept = state.read_bytes()
    code, err = outcome(a, capsys)
    check_one_line(code, err, ["prev.safetensors", "sha256 mismatch", "delete", "--restart"])
    assert state.read_bytes() == kept
    b_weights = (tmp_path / "prev.safetensors").read_bytes()
    assert main([str(x) for x in a + ["--lr", "0.01"]]) == 0  # B, from its finished state
    assert (tmp_path / "prev.safetensors").read_bytes() == b_weights and not state.exists()
    _, desc, _ = load_model(tmp_path / "prev")
    assert desc["settings"]["config"]["lr"] == 0.01


def test_a_damaged_finished_model_is_refused_and_restart_remakes_only_it(world, tmp_path, capsys):
    a = train_argv(world, tmp_path, "--epochs", "1")
    assert main([str(x) for x in a]) == 0
    good = (tmp_path / "prev.safetensors").read_bytes()
    flip(tmp_path / "prev.safetensors")
    code, err = outcome(a, capsys)
    check_one_line(code, err, ["prev.safetensors", "sha256 mismatch", "--restart"])
    assert main([str(x) for x in a + ["--restart"]]) == 0
    assert (tmp_path / "prev.safetensors").read_bytes() == good  # made again, the same bytes
    # --restart keeps a verified model of the same settings: nothing redone
    mtime = (tmp_path / "prev.safetensors").stat().st_mtime_ns
    assert main([str(x) for x in a + ["--restart"]]) == 0
    assert (tmp_path / "prev.safetensors").stat().st_mtime_ns == mtime
    (tmp_path / "prev.json").write_text('{"broken')  # an unreadable JSON: the remedy named
    code, err = outcome(a, capsys)
    check_one_line(code, err, ["prev.json", "not valid JSON", "--restart"])


def test_a_damaged_manifest_is_cleared_by_restart(world, tmp_path, capsys):
    syn = tmp_path / "syn"
    rec = ["reconstruct", "--teacher", world.teacher, "--objective", "spectral-pairs", "--images", "20",
           "--batch-size", "10", "--steps", "2", "--out", syn, "--quiet"]
    for text in ('{"broken', "[]", '{"config": 5}'):
        shutil.rmtree(syn, ignore_errors=True)
        shutil.copytree(world.synthetic, syn)
        (syn / "manifest.json").write_text(text)
        code, err = outcome(rec, capsys)
        check_one_line(code, err, ["manifest.json", "delete", "--restart"])
        assert main([str(a) for a in rec + ["--restart"]]) == 0
        assert json.loads((syn / "manifest.json").read_text())["complete"] is True


def test_an_old_format_state_is_named_never_unpickled(world, tmp_path, capsys):
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))
    (tmp_path / "prev.state.pt").write_bytes(pickle.dumps({"epoch": Boom()}))
    a = train_argv(world, tmp_path, "--epochs", "1")
    code, err = outcome(a, capsys)
    check_one_line(code, err, ["prev.state.pt", "old-format resume state", "delete it", "--restart"])
    assert not (tmp_path / "ran").exists()
    assert main([str(x) for x in a + ["--restart"]]) == 0 and not (tmp_path / "ran").exists()
    assert main([str(x) for x in a]) == 0  # finished: the old file no longer matters


def test_publish_copies_no_settings_or_data_fingerprint(world):
    """The teacher's JSON keeps its settings (the data's sha256 and row counts); the published folder
    holds none of them."""
    desc = json.loads((world.dir / "teacher.json").read_text())
    data = desc["settings"]["data"]
    secrets = [data["content_sha256"], data["content_sha256"][:16], "content_sha256", "settings", "rows"]
    for name in ("config.json", "README.md"):
        text = (world.dir / "pub" / name).read_text()
        assert not [s for s in secrets if s in text], name
    assert "settings" not in json.loads((world.dir / "pub" / "config.json").read_text())


# --- many ranks -------------------------------------------------------------------------------------
def _nan_on_one_rank(rank: int, rdzv: str, q) -> None:
    import datetime

    import torch.nn.functional as F

    from dfkd.errors import DfkdError
    from dfkd.loop import fit
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        net, calls = torch.nn.Linear(4, 3), []
        x, y = torch.randn(64, 4), torch.arange(64) % 3

        def loss(m, xb, yb, g):
            calls.append(1)
            out = F.cross_entropy(m(xb), yb)
            return out * float("nan") if rank == 1 and len(calls) == 3 else out
        try:
            fit(net, (x, y), loss, epochs=2, batch_size=16, lr=0.01, seed=0, progress=False)
            q.put((rank, "finished"))
        except DfkdError as e:
            q.put((rank, str(e)))
    finally:
        torch.distributed.destroy_process_group()


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_line(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_nan_on_one_rank, args=(r, str(tmp_path / "rdzv"), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    got = dict(q.get(timeout=5) for _ in range(2 - len(hung)))
    assert not hung and len(got) == 2, got
    assert got[0] == got[1] and "the loss became NaN at epoch 1, step 3" in got[0], got


def test_nonfinite_flag_alone():
    from dfkd.loop import nonfinite
    assert nonfinite(torch.tensor(1.0)) is None
    assert nonfinite(torch.tensor(float("nan"))) == "NaN"
    assert nonfinite(torch.tensor(float("-inf"))) == "infinite"


def test_results_holding_the_same_rows_are_left_as_they_were(tmp_path):
    """A run resumed after its last student finds results.json and results.md holding its rows: both are
    left byte for byte (and with the wall time of the run that made them); a damaged results.md is
    written again with results.json's wall time (the same bytes), and a new row rewrites both."""
    row = {"teacher": "lenet5", "student": "lenet5-half", "objective": "top-layer", "seed": 0, "accuracy": 0.5,
           "teacher_accuracy": 0.9, "paper_accuracy": 0.6, "image_steps": 10, "student_steps": 3,
           "seconds": {"reconstruct": 1.0, "distill": 2.0}, "history": [0.5], "history_epochs": [1]}
    cfg, files = RunConfig(out=str(tmp_path)), [tmp_path / "results.json", tmp_path / "results.md"]
    write_results(tmp_path, [row], cfg, t0=0.0)  # a wall time of the machine's uptime: clearly not now's
    before = [p.read_bytes() for p in files]
    write_results(tmp_path, [dict(row)], cfg, t0=1e12)
    assert [p.read_bytes() for p in files] == before
    files[1].write_text(files[1].read_text()[:-40])  # damaged (a table row cut): written again
    write_results(tmp_path, [row], cfg, t0=1e12)
    assert [p.read_bytes() for p in files] == before
    files[1].write_text(files[1].read_text() + "\n")  # damaged after its wall time line
    write_results(tmp_path, [row], cfg, t0=1e12)
    assert [p.read_bytes() for p in files] == before
    write_results(tmp_path, [row, dict(row, seed=1, accuracy=0.7)], cfg, t0=1e12)
    wall = json.loads(files[0].read_text())["wall_seconds"]
    assert wall < 0 and f"wall time so far: {wall:.0f} s" in files[1].read_text()  # this call's clock, in both
    assert len(json.loads(files[0].read_text())["rows"]) == 2 and "| 60.00 |" in files[1].read_text()
    before = [p.read_bytes() for p in files]
    write_results(tmp_path, [row], cfg, t0=0.0, final=False)  # on the way: a resumed run's later student finished
    assert [p.read_bytes() for p in files] == before  # never fewer rows on the way
    write_results(tmp_path, [row, dict(row, seed=1, accuracy=0.7)], cfg, t0=0.0)  # the final write: as they were
    assert [p.read_bytes() for p in files] == before


def test_the_report_names_its_data_and_sets_the_paper_beside_mnist_only(tmp_path):
    """results.md on the bundled MNIST carries the paper's figures and DAFL's noise line; on any other data
    it names the data and its classes and has neither."""
    row = {"teacher": "lenet5", "student": "lenet5-half", "objective": "top-layer", "seed": 0, "accuracy": 0.5,
           "teacher_accuracy": 0.9, "paper_accuracy": 0.773, "image_steps": 10, "student_steps": 3,
           "seconds": {}, "history": [0.5], "history_epochs": [1]}
    noise = dict(row, objective="noise", paper_accuracy=None)  # an MNIST row without a paper figure, last
    write_results(tmp_path, [row, noise], RunConfig(out=str(tmp_path)), t0=0.0, class_names=tuple("0123456789"))
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# dfkd results: MNIST, test accuracy on its 10,000 real test images")
    assert "| paper % | vs paper |" in md and "| 77.30 | -27.30 |" in md and "DAFL" in md
    lines = md.splitlines()
    assert lines[2].count("|") == lines[4].count("|") == lines[5].count("|") == 13  # 12 columns in every row
    other = tmp_path / "o"
    other.mkdir()
    write_results(other, [dict(row, paper_accuracy=None)], RunConfig(out=str(other), data="folder:/x/shoes"), t0=0.0,
                  class_names=("boot", "sandal"))
    md = (other / "results.md").read_text()
    assert md.startswith("# dfkd results: `folder:/x/shoes` (2 classes: boot, sandal), test accuracy on its real test")
    assert "MNIST" not in md and "paper" not in md and "DAFL" not in md
    assert md.splitlines()[4].count("|") == md.splitlines()[2].count("|") == 11  # 10 columns, as the head


def test_a_results_file_from_before_the_data_field_keeps_its_wall_time(tmp_path):
    """A finished run's results.json written before reports named their data: a resume adds the data field
    and keeps the wall time of the run that made the rows."""
    row = {"teacher": "lenet5", "student": "lenet5-half", "objective": "top-layer", "seed": 0, "accuracy": 0.5,
           "teacher_accuracy": 0.9, "paper_accuracy": 0.773, "image_steps": 10, "student_steps": 3,
           "seconds": {}, "history": [0.5], "history_epochs": [1]}
    cfg = RunConfig(out=str(tmp_path))
    write_results(tmp_path, [row], cfg, t0=0.0, class_names=tuple("0123456789"))
    doc = json.loads((tmp_path / "results.json").read_text())
    old = {k: v for k, v in doc.items() if k != "data"}
    (tmp_path / "results.json").write_text(json.dumps(dict(old, wall_seconds=3600.0)))
    write_results(tmp_path, [row], cfg, t0=1e12, class_names=tuple("0123456789"))
    new = json.loads((tmp_path / "results.json").read_text())
    assert new["wall_seconds"] == 3600.0 and new["data"]["spec"] == "mnist"
    assert "wall time so far: 3600 s" in (tmp_path / "results.md").read_text()


def test_results_ignore_how_the_run_ran(tmp_path):
    """A rerun that differs only in how it runs (--quiet, --device, --restart) finds its results made: it
    neither rewrites them nor, on the way, shrinks them."""
    row = {"teacher": "lenet5", "student": "lenet5-half", "objective": "top-layer", "seed": 0, "accuracy": 0.5,
           "teacher_accuracy": 0.9, "paper_accuracy": 0.773, "image_steps": 10, "student_steps": 3,
           "seconds": {}, "history": [0.5], "history_epochs": [1]}
    two = [row, dict(row, seed=1)]
    write_results(tmp_path, two, RunConfig(out=str(tmp_path)), t0=0.0)
    files = [tmp_path / "results.json", tmp_path / "results.md"]
    before = [p.read_bytes() for p in files]
    other = RunConfig(out=str(tmp_path), progress=False, device="cuda", restart=True)
    write_results(tmp_path, [row], other, t0=1e12, final=False)
    write_results(tmp_path, two, other, t0=1e12)
    assert [p.read_bytes() for p in files] == before
    write_results(tmp_path, two, RunConfig(out=str(tmp_path), seeds=2), t0=1e12)  # what it makes: rewritten
    assert [p.read_bytes() for p in files] != before


def test_a_synthetic_set_whose_manifest_lacks_a_setting_names_it_absent(tmp_path):
    """A manifest lacking a setting of the set's key (hand-edited, or written before the setting existed) is
    refused with that setting named absent, not as a null the user never gave."""
    SyntheticSet(tmp_path / "set").begin({"settings": {"n": 4}, "teacher": "t"})
    path = tmp_path / "set" / "manifest.json"
    m = json.loads(path.read_text())
    del m["teacher"]
    path.write_text(json.dumps(m))
    with pytest.raises(OtherSettings) as e:
        SyntheticSet(tmp_path / "set").begin({"settings": {"n": 4}, "teacher": "t"})
    assert "other settings (teacher absent -> t)" in e.value.problem and e.value.differing == (("teacher", None, "t"),)


def test_a_resumed_stage_counts_the_epochs_of_every_process(world, tmp_path, monkeypatch):
    """dfkd run's seconds for a stage that resumed (``students.timed``): the restored epochs' walls, kept in the
    resume state, count beside the last process's, not only the last process's wall. The first process's clock
    runs 100 s a reading, so its epoch's wall (at least 100 s) can reach the figure only through the state."""
    from itertools import count

    import dfkd.loop as loop
    from dfkd.models import build_model
    from dfkd.sources import open_data
    from dfkd.students import timed
    state = tmp_path / "s.state.safetensors"

    def run():
        torch.manual_seed(0)
        model, info = build_model("lenet5", open_data(world.data).info)
        return timed(training.train, model, open_data(world.data, info=info), TrainConfig(epochs=2, batch_size=500),
                     state_path=state, settings={"test": 1})
    fake = count(0.0, 100.0)
    with interrupted_after_first_epoch(monkeypatch), monkeypatch.context() as m:
        m.setattr(loop.time, "perf_counter", lambda: next(fake))
        with pytest.raises(KeyboardInterrupt):
            run()
    t0 = time.perf_counter()
    hist, secs = run()
    elapsed = time.perf_counter() - t0
    assert [h["epoch"] for h in hist] == [1, 2] and hist[0]["wall"] >= 100 and hist[1]["wall"] > 0
    # at least both epochs, at most the first process's epoch and all of this call (nothing counted twice)
    assert hist[0]["wall"] + hist[1]["wall"] <= secs <= hist[0]["wall"] + elapsed
