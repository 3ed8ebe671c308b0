"""Crash trials: ``kill -9`` of ``record``, ``reconstruct``, ``distill`` and ``run`` at chosen points,
then the same command again until it finishes. The outputs must be bit-identical to an
uninterrupted run's (weights, statistics and shards byte for byte; JSON equal but for timings), no
temp file may be left, at no moment may a file be half-written (every file a reader would open
parses), and a resumed run must not redo the work that was finished before the kill.

The kills are placed by write, not by clock (``dfkd.faults``): ``DFKD_TEST_CRASH_AT=K`` kills the
process during its K-th atomic write, after the temp file is written and before the rename (the
moment that leaves a temp file behind), ``K+`` right after the rename. Between two writes a kill
leaves the disk as it was after the last rename, so these points reach every state a kill at any
moment can leave. CI kills ``run`` at two such points (the first while it saves the teacher, where
a killed run once left ``lenet5/.teacher.safetensors.*.tmp``) and ``record``, which writes one file,
once; the slow suite does the same to ``reconstruct`` and ``distill``, and kills each of the four
at every write, before and after its rename.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dfkd.files import load_tensors, read_json


def commands(world, out: Path) -> dict[str, list[str]]:
    t = str(world.teacher)
    return {
        "record": ["record", "--teacher", t, "--out", str(out / "t.stats.safetensors"), "--batch-size", "100"],
        "reconstruct": ["reconstruct", "--teacher", t, "--stats", str(world.stats), "--objective", "all-layers",
                        "--images", "60", "--batch-size", "20", "--steps", "10", "--out", str(out / "syn")],
        "distill": ["distill", "--synthetic", str(world.synthetic), "--teacher", t, "--out", str(out / "student"),
                    "--epochs", "6", "--batch-size", "8", "--augment", "shift+mix"],
        "run": ["run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer", "--no-baselines",
                "--images", "40", "--steps", "20", "--data", world.data, "--out", str(out / "run")],
    }


def start(args: list[str], log: Path, crash: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", DFKD_TEST_WRITE_LOG=str(log))
    env.pop("DFKD_TEST_CRASH_AT", None)
    if crash:
        env["DFKD_TEST_CRASH_AT"] = crash
    return subprocess.Popen([sys.executable, "-m", "dfkd", *args, "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def writes(log: Path, out: Path) -> list[str]:
    """The targets a process renamed into place, in order, relative to ``out``."""
    if not log.is_file():
        return []
    return [str(Path(line).relative_to(out)) for line in log.read_text().splitlines()]


TIMING = ("seconds", "wall", "wall_seconds", "timings")


def _strip(obj):
    """JSON without what differs between two runs by nature: timings and paths inside the output folder."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING and k not in ("out", "synthetic")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def snapshot(out: Path) -> dict[str, object]:
    """Every output file under ``out``: safetensors by their bytes, JSON without timings."""
    snap = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = str(p.relative_to(out))
        if p.suffix == ".safetensors":
            snap[rel] = p.read_bytes()
        elif p.suffix == ".json":
            snap[rel] = _strip(json.loads(p.read_text()))
    return snap


def assert_whole(out: Path) -> None:
    """At this instant no file a reader opens is half-written (temp files are named .*.tmp)."""
    for p in out.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix == ".safetensors":
                load_tensors(p)
            elif p.suffix == ".json":
                read_json(p)


def trial(world, tmp: Path, verb: str, reference: dict, crashes: list[str]) -> None:
    """Run ``verb`` killed at each of ``crashes`` in turn (one process each), then to the end."""
    ref, ref_writes = reference
    out = tmp / f"{verb}-{'-'.join(c.replace('+', 'p') for c in crashes)}"
    out.mkdir()
    args = commands(world, out)[verb]
    done: list[str] = []
    for i, crash in enumerate(crashes):
        log = out.parent / f"{out.name}.{i}.log"
        p = start(args, log, crash)
        _, err = p.communicate(timeout=600)
        assert p.returncode == -signal.SIGKILL, f"{verb} was to be killed at write {crash}: exit {p.returncode} {err}"
        assert_whole(out)
        if not crash.endswith("+"):  # killed between writing a temp file and renaming it: one is left
            assert list(out.rglob(".*.dfkd-tmp")), f"{verb}: no temp file left by the kill at write {crash}"
        done += writes(log, out)
    log = out.parent / f"{out.name}.final.log"
    p = start(args, log)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert not list(out.rglob("*.dfkd-tmp")), list(out.rglob("*.dfkd-tmp"))
    got = snapshot(out)
    assert got.keys() == ref.keys()
    for k in got:
        assert got[k] == ref[k], f"{verb}: {k} differs from the uninterrupted run"
    final = writes(log, out)
    if verb != "record":  # record is one pass and starts again; the others resume
        once = {w for w, n in Counter(ref_writes).items() if n == 1}
        redone = sorted(once & set(done) & set(final))
        assert not redone, f"{verb}: finished work redone after the kill: {redone}"
        # a kill before a rename may cost the write it interrupted; one after a rename costs nothing
        lost = sum(not c.endswith("+") for c in crashes)
        assert len(done) + len(final) <= len(ref_writes) + lost, (done, final, ref_writes)


class References(dict):
    """Each command run once uninterrupted, in a folder of its own, when a test first asks for it:
    its outputs and the writes it made."""

    def __init__(self, world, tmp_path_factory):
        super().__init__()
        self.world, self.factory = world, tmp_path_factory

    def __missing__(self, verb: str):
        out = self.factory.mktemp(f"ref-{verb}")
        log = out.parent / f"{out.name}.log"
        p = start(commands(self.world, out)[verb], log)
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        self[verb] = (snapshot(out), writes(log, out))
        return self[verb]


@pytest.fixture(scope="module")
def references(world, tmp_path_factory):
    return References(world, tmp_path_factory)


def ci_crashes(verb: str, ref_writes: list[str]) -> list[str]:
    """Two kills: the first before the rename of a write in the middle (``run``: of the teacher's
    weights, the case that once failed), the second right after the resumed run's second rename."""
    if verb == "record":
        return ["1"]
    if verb == "run":
        k = next(i for i, w in enumerate(ref_writes, 1) if w.endswith("lenet5/teacher.safetensors"))
    else:
        k = len(ref_writes) // 2
    return [str(k), "2+"]


# CI kills record and run (the case that once failed); reconstruct and distill on their own, and every
# write of all four, are the slow suite's (in CI, test_reconstruct, test_distributed and test_resume kill
# and resume those two: a shard-level kill of two ranks, an interrupted reconstruction, a kill between
# a student's weights and its description)
@pytest.mark.parametrize("verb", ["record", pytest.param("reconstruct", marks=pytest.mark.slow),
                                  pytest.param("distill", marks=pytest.mark.slow), "run"])
def test_crash_trial(world, tmp_path, references, verb):
    trial(world, tmp_path, verb, references[verb], ci_crashes(verb, references[verb][1]))


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["record", "reconstruct", "distill", "run"])
def test_crash_at_every_write(world, tmp_path, references, verb):
    n = len(references[verb][1])
    for k in range(1, n + 1):
        for crash in (str(k), f"{k}+"):
            if crash == f"{n}+":  # after the last rename the command is done: nothing left to kill
                continue
            trial(world, tmp_path, verb, references[verb], [crash])


def test_killed_runs_temp_swept_in_sub_folders(tmp_path):
    """A temp file a killed process left in a sub-folder of a locked output folder is swept when the
    next run takes the lock; one left beside an output file, in that file's folder. A temp file
    that a live process is writing (it holds its lock) is kept, and so is a user's file that only
    looks like a temp file."""
    from dfkd.files import exclusive, sweep_temps

    sub = tmp_path / "run" / "lenet5"
    sub.mkdir(parents=True)
    orphan = sub / ".teacher.safetensors.4242.abc123.dfkd-tmp"   # its writer is gone: nobody holds it
    live = sub / ".teacher.json.4243.def456.dfkd-tmp"
    users = [sub / ".thesis.2023.draft.tmp", sub / ".notes.dfkd-tmp", sub / ".x.99999999999999999999.y.tmp"]
    for p in (orphan, live, *users):
        p.write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'rb'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(live)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with exclusive(tmp_path / "run", folder=True):
            pass
        assert not orphan.exists() and live.exists() and all(p.exists() for p in users)
    finally:
        holder.communicate("")
    assert sweep_temps(tmp_path, recursive=True) == 1 and not live.exists()  # its writer has gone now
    beside = tmp_path / ".s.stats.safetensors.4244.aaaaaa.dfkd-tmp"
    beside.write_bytes(b"partial")
    with exclusive(tmp_path / "s.stats.safetensors"):
        pass
    assert not beside.exists() and all(p.exists() for p in users)


def test_a_write_holds_its_temp_file_until_the_rename(tmp_path, monkeypatch):
    """While ``atomic_write`` writes, its temp file is locked, so a sweep in that moment keeps it."""
    from dfkd import faults, files

    seen = []

    def sweep_midway(path, replaced):
        if not replaced:
            temps = list(tmp_path.glob(".*.dfkd-tmp"))
            seen.append((len(temps), files.sweep_temps(tmp_path), all(t.exists() for t in temps)))

    monkeypatch.setattr(faults, "point", sweep_midway)
    files.atomic_write(tmp_path / "a.json", "{}")
    assert seen == [(1, 0, True)] and (tmp_path / "a.json").read_text() == "{}"
    assert not list(tmp_path.glob(".*.dfkd-tmp"))


def test_a_sweep_between_creating_and_locking_a_temp_file_costs_nothing(tmp_path, monkeypatch):
    """A sweep may take a temp file in the instant after its creation and before its writer locks
    it; the writer then finds its file gone and makes another, and the write succeeds."""
    from dfkd import files

    real, swept = files.tempfile.mkstemp, []

    def mkstemp_then_sweep(*args, **kw):
        fd, name = real(*args, **kw)
        if not swept:
            swept.append(files.sweep_temps(tmp_path))
        return fd, name

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp_then_sweep)
    files.atomic_write(tmp_path / "a.json", '{"a": 1}')
    assert swept == [1] and (tmp_path / "a.json").read_text() == '{"a": 1}'
    assert not list(tmp_path.glob(".*.dfkd-tmp"))
