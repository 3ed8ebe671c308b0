"""The distribution format as a user meets it: a publisher writes a folder in one process; in a
fresh process holding only that folder (no data, no run directory), the commands on its model
card reach the same student, bit for bit, as the run that had everything. For a registry model
on IDX digits and for a user's BatchNorm/residual model on a colour image folder; and through a
pre-filled hub cache with ``HF_HUB_OFFLINE=1`` (nothing touches the network)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dfkd.kinds import REGISTRY
from tests.conftest import OWN

SMALL = {"reconstruct": ["--images", "40", "--batch-size", "20", "--steps", "3"], "distill": ["--epochs", "1"]}


def dfkd(*args, cwd=None, env=None):
    e = dict(os.environ, **(env or {}))  # the tests' thread count (conftest): the same on both sides of a comparison
    return subprocess.run([sys.executable, "-m", "dfkd", *map(str, args), "--quiet"], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=600)


def card_commands(folder: Path) -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("dfkd ")]


def test_card_commands_parse_with_the_command_line():
    """The card spells its commands from data (``publishing.CARD_FLAGS``; the library never imports the
    command line): every flag there is its verb's own, with the config's default, and a command made of
    values other than the defaults parses back to those values."""
    from dfkd.cli_parser import build_parser
    from dfkd.config import default
    from dfkd.publishing import CARD_FLAGS, card_command

    parser = build_parser()
    fixed = {"reconstruct": ["--teacher", "t"], "distill": ["--synthetic", "s", "--out", "o"]}
    other = {"objective": "all-layers", "init": "noise", "augment": "shift+cutmix", "schedule": "cosine",
             "views": "affine+colour", "unit_targets": "batch", "basis": "fourier"}
    for verb, (cls, flags) in CARD_FLAGS.items():
        sub = parser.parse_args([verb, *fixed[verb]])
        values = {}
        for name in flags:
            d = default(cls, name)
            if isinstance(d, str):
                values[name] = other[name]
            else:
                values[name] = not d if isinstance(d, bool) else d + 1 if isinstance(d, int) else d * 2 + 0.5
            dest = f"no_{name}" if isinstance(d, bool) else name
            assert getattr(sub, dest) == (False if isinstance(d, bool) else d), (verb, name)
        line = card_command(verb, dict(values, seed=3), fixed[verb])
        assert line.startswith(f"dfkd {verb} ")
        args = parser.parse_args(shlex.split(line)[1:])
        for name, v in values.items():
            assert getattr(args, f"no_{name}" if isinstance(v, bool) else name) == (True if isinstance(v, bool) else v)
        assert args.seed == 3
        assert card_command(verb, {n: default(cls, n) for n in flags}, fixed[verb]) == " ".join(["dfkd", verb,
                                                                                                 *fixed[verb]])
        # and back: every method setting of the verb is on the card (a new field cannot be left off it)
        run_wide = {"seed"}  # (device, progress and rank are no method config's: config.Runtime)
        assert {f.name for f in dataclasses.fields(cls)} - run_wide == set(flags), verb


def original_run(tmp: Path, teacher: Path, code: list[str], student: list[str], data: list[str]) -> Path:
    """The publisher's own run, with everything at hand: reconstruct, then distill a student."""
    r = dfkd("reconstruct", "--teacher", teacher, *code, "--objective", "all-layers", *SMALL["reconstruct"],
             "--jitter", "1", "--out", tmp / "syn")
    assert r.returncode == 0, r.stderr
    r = dfkd("distill", "--synthetic", tmp / "syn", "--teacher", teacher, *code, *student, *SMALL["distill"],
             *data, "--out", tmp / "student")
    assert r.returncode == 0, r.stderr
    return tmp / "student"


def round_trip(tmp: Path, teacher: Path, code: list[str], student: list[str], data: list[str], code_file: Path | None):
    ref = original_run(tmp / "orig", teacher, code, student, data)
    r = dfkd("publish", "--teacher", teacher, *code, "--student", ref, "--repo", "someone/model", "--out", tmp / "pub")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp / "pub").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                               "stats.safetensors"]
    # a user's machine: the folder alone (and the model's code, if it has any), in a fresh folder
    user = tmp / "user"
    shutil.copytree(tmp / "pub", user / "model")
    if code_file:
        shutil.copy(code_file, user / code_file.name)
    cmds = card_commands(tmp / "pub")
    assert [c[1] for c in cmds] == ["reconstruct", "distill"]
    for cmd in cmds:
        args = ["model" if a == "hf:someone/model" else a for a in cmd[1:]]
        r = dfkd(*args, *SMALL[cmd[1]], cwd=user)
        assert r.returncode == 0, (cmd, r.stderr)
    assert (user / "student.safetensors").read_bytes() == ref.with_suffix(".safetensors").read_bytes()
    return tmp / "pub"


@pytest.mark.slow  # slow (36 s): publishing from user code (test_deploy's generator run) and reconstructing from a
# folder (test_beyond_bn's ViT, the hub test below) stay in the default run
def test_registry_model_round_trip(world, tmp_path):
    pub = round_trip(tmp_path, world.teacher, [], ["--student", "lenet5-half"], [], None)
    cfg = json.loads((pub / "config.json").read_text())
    assert cfg["format"] == "dfkd-folder" and cfg["version"] == 1 and cfg["model"]["spec"] == "lenet5"
    assert cfg["num_classes"] == 10 and cfg["pretrained_cfg"]["input_size"] == [1, 32, 32]
    card = (pub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: dfkd\n") and "all-layers" in card and "test accuracy" in card
    assert f"\n| all-layers | {REGISTRY['all-layers'].reveals} | " in card  # what it holds, then its size


@pytest.mark.slow  # slow (40 s on a busy machine): as above
def test_own_bn_model_round_trip_on_colour_folder(colour_dir, tmp_path):
    """A user's model: the folder records its import spec and sha256, never the code; the user names
    the code with --code, as the card says."""
    r = dfkd("train", "--model", f"{OWN}:teacher", "--model-args", '{"in_channels": 3, "width": 8}',
             "--data", f"folder:{colour_dir}", "--normalize", "auto", "--epochs", "1", "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    r = dfkd("record", "--teacher", tmp_path / "t" / "teacher", "--code", OWN, "--kinds", "top-layer,all-layers")
    assert r.returncode == 0, r.stderr
    pub = round_trip(tmp_path, tmp_path / "t" / "teacher", ["--code", str(OWN)],
                     ["--student", f"{OWN}:student", "--student-args", '{"in_channels": 3, "width": 8}'],
                     ["--data", f"folder:{colour_dir}"], OWN)
    cfg = json.loads((pub / "config.json").read_text())
    assert cfg["model"]["code_sha256"] and len(cfg["pretrained_cfg"]["mean"]) == 3
    assert not list(pub.glob("*.py")) and "--code own_model.py" in (pub / "README.md").read_text()


def hub_cache(root: Path, repo: str, folder: Path, commit: str = "a" * 40) -> Path:
    """A hub cache as huggingface_hub leaves it after a download: refs/main and one snapshot."""
    d = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, d / "snapshots" / commit)
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    return root


def test_hub_reference_from_the_cache_offline(world, tmp_path):
    cache = hub_cache(tmp_path / "hub", "someone/lenet5", world.folder)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = dfkd("reconstruct", "--teacher", "hf:someone/lenet5", "--objective", "all-layers", *SMALL["reconstruct"],
             "--out", tmp_path / "a", env=env)
    assert r.returncode == 0, r.stderr
    r2 = dfkd("reconstruct", "--teacher", world.folder, "--objective", "all-layers", *SMALL["reconstruct"],
              "--out", tmp_path / "b")
    assert r2.returncode == 0, r2.stderr
    names = sorted(s.name for s in (tmp_path / "a").glob("shard-*.safetensors"))
    assert len(names) == 2 and names == sorted(s.name for s in (tmp_path / "b").glob("shard-*.safetensors"))  # 40 / 20
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    r = dfkd("reconstruct", "--teacher", "hf:someone/lenet5@v9", "--out", tmp_path / "c", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("dfkd: hf:someone/lenet5@v9: cannot get it from the hub (HF_HUB_OFFLINE is set")
