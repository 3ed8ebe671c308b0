"""Crash trials: ``kill -9`` of ``record``, ``reconstruct``, ``distill`` and ``run`` at random
moments, then the same command again until it finishes. The outputs must be bit-identical to an
uninterrupted run's (weights, statistics and shards byte for byte; JSON equal but for timings),
and at no moment may a file be half-written (every file a reader would open parses). CI runs
one trial per command; the slow suite five per command (20 in all).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfkd.checkpoint import load_tensors, read_json


def commands(world, out: Path) -> dict[str, list[str]]:
    t = str(world.teacher)
    return {
        "record": ["record", "--teacher", t, "--out", str(out / "t.stats.safetensors"), "--batch-size", "100"],
        "reconstruct": ["reconstruct", "--teacher", t, "--stats", str(world.stats), "--objective", "all-layers",
                        "--images", "120", "--batch-size", "20", "--steps", "40", "--out", str(out / "syn")],
        "distill": ["distill", "--synthetic", str(world.synthetic), "--teacher", t, "--out", str(out / "student"),
                    "--epochs", "12", "--batch-size", "8", "--augment", "shift+mix"],
        "run": ["run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer", "--no-baselines",
                "--images", "40", "--steps", "20", "--data", world.data, "--out", str(out / "run")],
    }


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dfkd", *args, "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


TIMING = ("seconds", "wall_seconds", "timings")


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


def held(out: Path, pid: int) -> bool:
    """Whether process ``pid`` holds a lock on an output under ``out`` (Linux's /proc/locks), i.e.
    it is past start-up and writing."""
    inodes = {p.stat().st_ino for p in out.rglob("*.lock")}
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and f[4] == str(pid) and int(f[5].split(":")[-1]) in inodes:
            return True
    return False


def wait_until_working(p: subprocess.Popen, out: Path) -> float:
    """Block until ``p`` holds its output's lock (start-up done) or exits; returns the seconds waited."""
    t0 = time.perf_counter()
    while p.poll() is None and not held(out, p.pid):
        time.sleep(0.02)
    return time.perf_counter() - t0


def trial(world, tmp: Path, verb: str, reference: dict, work: float, rng: random.Random) -> tuple[int, int]:
    """Kill the command at random moments (up to three times), then let it finish; returns the kills
    and how many of them landed mid-work (after the command took its output's lock)."""
    out = tmp / f"{verb}-{rng.randrange(10 ** 6)}"
    out.mkdir()
    args = commands(world, out)[verb]
    kills = mid = 0
    for _ in range(3):
        p = start(args)
        wait_until_working(p, out)
        time.sleep(rng.uniform(0.0, 0.6) * work)
        if p.poll() is not None:
            break
        busy = held(out, p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        mid += busy
        assert_whole(out)
    p = start(args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    got = snapshot(out)
    assert got.keys() == reference.keys()
    for k in got:
        assert got[k] == reference[k], f"{verb}: {k} differs from the uninterrupted run"
    print(f"crash trial {verb}: {kills} kill(s), {mid} mid-work; outputs bit-identical")
    return kills, mid


@pytest.fixture(scope="module")
def references(world, tmp_path_factory):
    """Each command run once uninterrupted, in a folder of its own: its outputs and its working time
    (from taking its output's lock to exiting)."""
    refs = {}
    for verb in ("record", "reconstruct", "distill", "run"):
        out = tmp_path_factory.mktemp(f"ref-{verb}")
        p = start(commands(world, out)[verb])
        wait_until_working(p, out)
        t0 = time.perf_counter()
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        refs[verb] = (snapshot(out), time.perf_counter() - t0)
    return refs


@pytest.mark.parametrize("verb", ["record", "reconstruct", "distill", "run"])
def test_crash_trial(world, tmp_path, references, verb):
    ref, work = references[verb]
    kills, mid = run_trials(world, tmp_path, verb, ref, work, n=1, seed=0)
    assert mid >= 1, "no kill landed mid-work"


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["record", "reconstruct", "distill", "run"])
def test_crash_trials_slow(world, tmp_path, references, verb):
    ref, work = references[verb]
    kills, mid = run_trials(world, tmp_path, verb, ref, work, n=5, seed=1)
    assert mid >= 5, (kills, mid)


def run_trials(world, tmp, verb, ref, work, n, seed) -> tuple[int, int]:
    rng = random.Random(f"{verb}:{seed}")
    kills = mid = 0
    for _ in range(n):
        k, m = trial(world, tmp, verb, ref, work, rng)
        kills, mid = kills + k, mid + m
    return kills, mid
