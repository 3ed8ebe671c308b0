"""The command line as a user runs it: each sub-command end to end at tiny sizes, and bad input."""
import json
import os
import subprocess
import sys

import pytest


def dfkd(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "dfkd", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfkd: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, idx_dir):
    """train -> record -> reconstruct -> distill through the CLI on 2,000 real images."""
    d = tmp_path_factory.mktemp("cli")
    r = dfkd("train", "--model", "lenet5", "--out", d, "--epochs", "2", "--data-dir", idx_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    r = dfkd("record", "--teacher", d / "teacher", "--data-dir", idx_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    r = dfkd("reconstruct", "--teacher", d / "teacher", "--objective", "spectral-pairs", "--n", 40,
             "--batch-size", 20, "--steps", 5, "--quiet")
    assert r.returncode == 0, r.stderr
    r = dfkd("distill", "--synthetic", d / "synthetic" / "spectral-pairs", "--teacher", d / "teacher",
             "--out", d / "student", "--epochs", 2, "--data-dir", idx_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    return d


def test_pipeline_files(run_dir):
    for f in ["teacher.safetensors", "teacher.json", "teacher.stats.safetensors", "student.safetensors",
              "student.json", "synthetic/spectral-pairs/manifest.json", "synthetic/spectral-pairs/samples.png"]:
        assert (run_dir / f).is_file(), f
    desc = json.loads((run_dir / "teacher.json").read_text())
    assert desc["arch"] == "lenet5" and desc["num_classes"] == 10 and len(desc["sha256"]) == 64
    assert 0.5 < desc["test_accuracy"] <= 1
    assert not list(run_dir.rglob("*.tmp"))


def test_evaluate_and_inspect(run_dir, idx_dir):
    r = dfkd("evaluate", run_dir / "student", "--teacher", run_dir / "teacher", "--data-dir", idx_dir, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["n"] == 500 and 0 <= res["agreement"] <= 1
    r = dfkd("inspect", run_dir / "teacher.stats.safetensors")
    assert r.returncode == 0, r.stderr
    assert "spectral_pairs" in r.stdout and "larger" in r.stdout


def test_run_tiny_profile_writes_its_table(tmp_path, idx_dir):
    r = dfkd("run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer,spectral-all",
             "--out", tmp_path, "--data-dir", idx_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert [row["objective"] for row in res["rows"]] == ["real-data", "real-kd", "top-layer", "spectral-all"]
    for row in res["rows"]:
        assert row["teacher"] == "lenet5" and row["student"] == "lenet5-half" and 0 <= row["accuracy"] <= 1
        assert set(row) >= {"teacher_accuracy", "paper_accuracy", "seconds"}
    assert res["rows"][2]["paper_accuracy"] == pytest.approx(0.7730)
    assert "| lenet5 | lenet5-half | top-layer |" in (tmp_path / "results.md").read_text()
    again = dfkd("run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer,spectral-all",
                 "--out", tmp_path, "--data-dir", idx_dir, "--quiet")
    assert again.returncode == 0 and json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]


def test_run_overrides_share_teachers_and_skip_baselines(tmp_path, idx_dir):
    """What ``python -m benchmarks curve`` does per budget: one teacher, other recipes, no baselines."""
    first = dfkd("run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer",
                 "--out", tmp_path / "a", "--data-dir", idx_dir, "--quiet", "--no-baselines")
    assert first.returncode == 0, first.stderr
    r = dfkd("run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer", "--out", tmp_path / "b",
             "--teachers", tmp_path / "a", "--images", "20", "--steps", "3", "--no-baselines", "--data-dir", idx_dir,
             "--quiet")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [row["objective"] for row in rows] == ["top-layer"] and rows[0]["image_steps"] == 20 * 3
    assert not (tmp_path / "b" / "lenet5" / "teacher.json").exists()  # the first run's teacher was used
    manifest = json.loads((tmp_path / "b" / "lenet5" / "synthetic" / "top-layer" / "manifest.json").read_text())
    assert manifest["n"] == 20 and manifest["config"]["steps"] == 3


def test_bad_inputs_are_one_line(run_dir, tmp_path, idx_dir):
    one_line_error(dfkd("train", "--model", "resnet"), "--model", "hinton-1200")
    one_line_error(dfkd("train", "--epochs", "0"), "--epochs")
    one_line_error(dfkd("evaluate", tmp_path / "nothing"), "nothing.json", "no such file")
    broken = tmp_path / "broken"
    (tmp_path / "broken.json").write_text((run_dir / "teacher.json").read_text())
    (tmp_path / "broken.safetensors").write_bytes((run_dir / "teacher.safetensors").read_bytes()[:1000])
    one_line_error(dfkd("evaluate", broken), "broken.safetensors", "truncated or corrupt")
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(dfkd("evaluate", tmp_path / "bad"), "bad.json", "not valid JSON")
    stats = tmp_path / "t.stats.safetensors"
    stats.write_bytes((run_dir / "teacher.stats.safetensors").read_bytes()[:-50])
    one_line_error(dfkd("inspect", stats), "t.stats.safetensors")
    one_line_error(dfkd("record", "--teacher", run_dir / "teacher", "--layers", "fc9", "--out", tmp_path / "x",
                        "--data-dir", idx_dir), "--layers", "nearest")
    assert not (tmp_path / "x").exists()
    one_line_error(dfkd("reconstruct", "--teacher", run_dir / "teacher", "--objective", "magic"), "--objective")
    # a stats file recorded on another teacher
    r = dfkd("train", "--model", "lenet5", "--out", tmp_path, "--name", "other", "--epochs", "1",
             "--data-dir", idx_dir, "--quiet")
    assert r.returncode == 0
    one_line_error(dfkd("reconstruct", "--teacher", tmp_path / "other", "--stats", run_dir / "teacher.stats.safetensors",
                        "--out", tmp_path / "syn"), "another teacher")
    # a stats file lacking the kind: the message names the record command
    r = dfkd("record", "--teacher", tmp_path / "other", "--kinds", "top_layer", "--data-dir", idx_dir, "--quiet")
    assert r.returncode == 0
    one_line_error(dfkd("reconstruct", "--teacher", tmp_path / "other", "--objective", "spectral-pairs",
                        "--out", tmp_path / "syn2"), "dfkd record --teacher", "--kinds spectral_pairs")
    # a synthetic set that does not fit the student
    one_line_error(dfkd("distill", "--synthetic", run_dir / "synthetic" / "spectral-pairs", "--student",
                        "hinton-800", "--out", tmp_path / "s", "--data-dir", idx_dir), "do not fit the student")
    assert not list(tmp_path.rglob("*.tmp"))
