"""The command line as a user runs it: each sub-command end to end at tiny sizes, and the README's
own-model section as written (bad input: tests/test_bad_input.py)."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from dfkd.synthetic import SyntheticSet
from tests.conftest import ROOT


def dfkd(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "dfkd", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, idx_dir):
    """train -> record -> reconstruct -> distill through the CLI on 2,000 real images."""
    d = tmp_path_factory.mktemp("cli")
    r = dfkd("train", "--model", "lenet5", "--out", d, "--epochs", "2", "--data", f"idx:{idx_dir}", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    r = dfkd("record", "--teacher", d / "teacher", "--quiet")  # the teacher's own data, from its description
    assert r.returncode == 0, r.stderr
    r = dfkd("reconstruct", "--teacher", d / "teacher", "--objective", "spectral-pairs", "--images", 40,
             "--batch-size", 20, "--steps", 5, "--quiet")
    assert r.returncode == 0, r.stderr
    r = dfkd("distill", "--synthetic", d / "synthetic" / "spectral-pairs", "--teacher", d / "teacher",
             "--out", d / "student", "--epochs", 2, "--quiet")
    assert r.returncode == 0, r.stderr
    return d


def test_pipeline_files(run_dir, idx_dir):
    for f in ["teacher.safetensors", "teacher.json", "teacher.stats.safetensors", "student.safetensors",
              "student.json", "synthetic/spectral-pairs/manifest.json", "synthetic/spectral-pairs/samples.png"]:
        assert (run_dir / f).is_file(), f
    desc = json.loads((run_dir / "teacher.json").read_text())
    assert desc["model"]["spec"] == "lenet5" and desc["data"]["num_classes"] == 10 and len(desc["sha256"]) == 64
    assert desc["data"]["shape"] == [1, 32, 32] and desc["data"]["name"] == f"idx:{idx_dir}"
    assert 0.5 < desc["test_accuracy"] <= 1
    student = json.loads((run_dir / "student.json").read_text())
    assert student["model"]["spec"] == "lenet5-half" and 0 <= student["test_accuracy"] <= 1
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*.state.pt"))


def test_evaluate_and_inspect(run_dir):
    r = dfkd("evaluate", run_dir / "student", "--teacher", run_dir / "teacher", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["n"] == 500 and 0 <= res["agreement"] <= 1 and len(res["per_class"]) == 10
    r = dfkd("inspect", run_dir / "teacher.stats.safetensors")
    assert r.returncode == 0, r.stderr
    assert "spectral-pairs" in r.stdout and "larger" in r.stdout and "per channel" in r.stdout


def test_run_tiny_profile_writes_its_table(tmp_path, idx_dir):
    args = ["run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer,spectral-all",
            "--out", tmp_path, "--data", f"idx:{idx_dir}", "--quiet"]
    r = dfkd(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert [row["objective"] for row in res["rows"]] == ["real-data", "real-kd", "top-layer", "spectral-all"]
    for row in res["rows"]:
        assert row["teacher"] == "lenet5" and row["student"] == "lenet5-half" and 0 <= row["accuracy"] <= 1
        assert set(row) >= {"teacher_accuracy", "paper_accuracy", "seconds"}
    assert res["rows"][2]["paper_accuracy"] == pytest.approx(0.7730)
    assert "| lenet5 | lenet5-half | top-layer |" in (tmp_path / "results.md").read_text()
    again = dfkd(*args)
    assert again.returncode == 0 and json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]


def test_run_overrides_share_teachers_and_skip_baselines(tmp_path, idx_dir):
    """What ``python -m benchmarks curve`` does per budget: one teacher, other recipes, no baselines."""
    data = f"idx:{idx_dir}"
    first = dfkd("run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer",
                 "--out", tmp_path / "a", "--data", data, "--quiet", "--no-baselines")
    assert first.returncode == 0, first.stderr
    r = dfkd("run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer", "--out", tmp_path / "b",
             "--teachers", tmp_path / "a", "--images", "20", "--steps", "3", "--no-baselines", "--data", data, "--quiet",
             "--seeds", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = res["rows"]
    assert [(row["objective"], row["seed"]) for row in rows] == [("top-layer", 0), ("top-layer", 1)]
    assert rows[0]["image_steps"] == 20 * 3
    # the seeds change the synthetic set; the cell is their mean and spread
    x0, x1 = (SyntheticSet(tmp_path / "b" / "lenet5" / "synthetic" / f"top-layer{t}").open().load()[0]
              for t in ("", "-seed1"))
    assert not torch.equal(x0, x1)
    (cell,) = res["cells"]
    accs = [row["accuracy"] for row in rows]
    assert cell["accuracies"] == accs and cell["seeds"] == [0, 1]
    assert cell["accuracy"] == pytest.approx(sum(accs) / 2) and (cell["min"], cell["max"]) == (min(accs), max(accs))
    md = (tmp_path / "b" / "results.md").read_text()
    assert "mean of 2 seeds" in md and f"{100 * min(accs):.2f}..{100 * max(accs):.2f} | 2 |" in md
    assert not (tmp_path / "b" / "lenet5" / "teacher.json").exists()  # the first run's teacher was used
    manifest = json.loads((tmp_path / "b" / "lenet5" / "synthetic" / "top-layer" / "manifest.json").read_text())
    assert manifest["n"] == 20 and manifest["config"]["steps"] == 3


def readme_commands(section: str) -> list[list[str]]:
    """The commands of the first bash block under a README heading, joined over backslashes."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(section):]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    lines, cmds = block.replace("\\\n", " ").splitlines(), []
    for line in lines:
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            cmds.append(shlex.split(line))
    return cmds


# appended to the README's commands in CI (argparse keeps the last value): small sizes only
SMALL = {"colour_digits.py": ["--train", "600", "--test", "200"], "train": ["--epochs", "1"],
         "reconstruct": ["--images", "40", "--batch-size", "20", "--steps", "3"], "distill": ["--epochs", "1"]}


def test_readme_own_model_section_runs_as_written(tmp_path):
    """A user's own BN/residual teacher and GELU student on a colour image folder, from the README."""
    cmds = readme_commands("## Your own model and data")
    assert [c[1] if c[0] == "dfkd" else c[1].split("/")[-1] for c in cmds] == \
        ["colour_digits.py", "train", "record", "reconstruct", "distill", "evaluate"]
    out = ""
    for cmd in cmds:
        name = cmd[1] if cmd[0] == "dfkd" else cmd[1].split("/")[-1]
        argv = [sys.executable] + (["-m", "dfkd"] + cmd[1:] if cmd[0] == "dfkd" else cmd[1:])
        argv = [str(ROOT / a) if a.startswith("examples/") else a.replace("examples/", f"{ROOT}/examples/")
                if "examples/" in a and ":" in a else a for a in argv]
        r = subprocess.run(argv + SMALL.get(name, []) + (["--quiet"] if cmd[0] == "dfkd" else []), cwd=tmp_path,
                           capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, (cmd, r.stderr)
        out = r.stdout
    assert "test accuracy" in out and "agreement" in out
    desc = json.loads(next(tmp_path.rglob("teacher.json")).read_text())
    assert desc["data"]["shape"] == [3, 32, 32] and len(desc["data"]["mean"]) == 3
    assert desc["model"]["spec"].endswith("own_model.py:teacher")
