"""The command line as a user runs it: each sub-command end to end at tiny sizes, and the README's
own-model section as written (bad input: tests/test_bad_input.py)."""
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dfkd.cli import main
from dfkd.kinds import REGISTRY
from dfkd.synthetic import SyntheticSet
from tests.conftest import ROOT, assert_count, near_ties


def dfkd(*args, cwd=None):
    env = dict(os.environ)
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


def idx_predictions(idx_dir, stems: dict) -> tuple[dict, torch.Tensor, dict]:
    """Saved LeNet-5 models' predictions on the 500 IDX test images, made here: the IDX files read
    with numpy, padded to 32x32 and normalised by hand, the weights read with plain safetensors into
    float64 copies of the registry networks, one pass each. Returns them by name, the labels, and by
    name the near ties (``conftest.near_ties``), where dfkd's float32 prediction may go either way."""
    from dfkd.data import DataInfo
    from dfkd.models import build_model
    images = np.frombuffer((idx_dir / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
    labels = np.frombuffer((idx_dir / "t10k-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    labels = torch.from_numpy(labels.astype(np.int64))
    raw = torch.zeros(len(images), 1, 32, 32, dtype=torch.float64)
    raw[:, 0, 2:30, 2:30] = torch.from_numpy(images.copy()).double() / 255
    preds, near = {}, {}
    for name, stem in stems.items():
        desc = json.loads(stem.with_name(stem.name + ".json").read_text())
        assert desc["data"]["shape"] == [1, 32, 32]
        model = build_model(desc["model"]["spec"], DataInfo((1, 28, 28), 10))[0]
        model.load_state_dict(load_file(stem.with_name(stem.name + ".safetensors")))
        (mean,), (std,) = desc["data"]["mean"], desc["data"]["std"]
        with torch.no_grad():
            out32 = model.eval()(((raw - mean) / std).float()).double()
            out = model.double()((raw - mean) / std)
        preds[name], near[name] = out.argmax(1), near_ties(out, out32)
    return preds, labels, near


@pytest.fixture(scope="module")
def oracle(run_dir, idx_dir):
    return idx_predictions(idx_dir, {"teacher": run_dir / "teacher", "student": run_dir / "student"})


def test_pipeline_files(run_dir, idx_dir, oracle):
    for f in ["teacher.safetensors", "teacher.json", "teacher.stats.safetensors", "student.safetensors",
              "student.json", "synthetic/spectral-pairs/manifest.json", "synthetic/spectral-pairs/samples.png"]:
        assert (run_dir / f).is_file(), f
    desc = json.loads((run_dir / "teacher.json").read_text())
    assert desc["model"]["spec"] == "lenet5" and desc["data"]["num_classes"] == 10 and len(desc["sha256"]) == 64
    assert desc["data"]["shape"] == [1, 32, 32] and desc["data"]["name"] == f"idx:{idx_dir}"
    student = json.loads((run_dir / "student.json").read_text())
    assert student["model"]["spec"] == "lenet5-half"
    preds, y, near = oracle  # the saved accuracies are the counts of right answers on the 500 test images
    for name, saved in (("teacher", desc), ("student", student)):
        assert_count(saved["test_accuracy"], 500, preds[name] == y, near[name], name)
    assert desc["test_accuracy"] > 0.5
    assert not list(run_dir.rglob("*.dfkd-tmp")) and not list(run_dir.rglob("*.state.*"))


def test_evaluate_and_inspect(run_dir, oracle):
    r = dfkd("evaluate", run_dir / "student", "--teacher", run_dir / "teacher", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    preds, y, near = oracle
    (ps, pt), (ns, nt) = (preds["student"], preds["teacher"]), (near["student"], near["teacher"])
    # each figure within the bounds its own pair's near ties leave; one computed from a wrong pair (or
    # two swapped) fails wherever the right and the wrong pair's bounds do not overlap
    assert res["n"] == 500
    counts = {key: assert_count(res[key], 500, hit, nr, key) for key, hit, nr in
              (("accuracy", ps == y, ns), ("teacher_accuracy", pt == y, nt), ("agreement", ps == pt, ns | nt))}
    assert 0 < counts["agreement"] < 500, counts
    for c in range(10):
        k = y == c
        assert_count(res["per_class"][str(c)], int(k.sum()), (ps == c)[k], ns[k], c)
    # the line printed for a person carries the same figures
    assert f"test accuracy {100 * counts['accuracy'] / 500:.2f}% on 500 inputs" in r.stdout
    assert f"agreement {100 * counts['agreement'] / 500:.2f}%" in r.stdout
    # the teacher against itself: the same float32 predictions, so a wrong agreement shows with no luck
    own = dfkd("evaluate", run_dir / "teacher", "--teacher", run_dir / "teacher", "--json")
    own = json.loads(own.stdout[own.stdout.index("{"):])
    assert own["agreement"] == 1.0 and own["accuracy"] == own["teacher_accuracy"] == res["teacher_accuracy"] < 1
    r = dfkd("inspect", run_dir / "teacher.stats.safetensors")
    assert r.returncode == 0, r.stderr
    assert "spectral-pairs" in r.stdout and "larger" in r.stdout and "per channel" in r.stdout
    assert f"\nspectral-pairs: {REGISTRY['spectral-pairs'].reveals}\n" in r.stdout  # what each kind reveals


def test_run_tiny_profile_writes_its_table(tmp_path, idx_dir):
    args = ["run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer,spectral-all",
            "--out", tmp_path, "--data", f"idx:{idx_dir}", "--quiet"]
    r = dfkd(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert [row["objective"] for row in res["rows"]] == ["real-data", "real-kd", "top-layer", "spectral-all"]
    names = ["teacher"] + [row["objective"] for row in res["rows"]]
    preds, y, near = idx_predictions(idx_dir, {n: tmp_path / "lenet5" / (n if n == "teacher" else f"students/{n}")
                                               for n in names})
    for row in res["rows"]:  # each figure: the count of right answers of the model saved beside it
        assert row["teacher"] == "lenet5" and row["student"] == "lenet5-half"
        assert set(row) >= {"teacher_accuracy", "paper_accuracy", "seconds"}
        for key, name in (("accuracy", row["objective"]), ("teacher_accuracy", "teacher")):
            assert_count(row[key], 500, preds[name] == y, near[name], (key, name))
    # IDX files (here a 2,000-image part of MNIST) are not the paper's data: the report names them, and sets
    # no paper figure beside them
    assert all(row["paper_accuracy"] is None for row in res["rows"])
    assert res["data"] == {"spec": f"idx:{idx_dir}", "class_names": [str(i) for i in range(10)]}
    md = (tmp_path / "results.md").read_text()
    assert "| lenet5 | lenet5-half | top-layer |" in md
    assert md.startswith(f"# dfkd results: `idx:{idx_dir}` (10 classes: 0, 1, 2,") and "MNIST" not in md
    assert "paper" not in md and "DAFL" not in md
    before = [(tmp_path / f).read_bytes() for f in ("results.json", "results.md")]
    again = dfkd(*args)
    assert again.returncode == 0 and json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]
    # every student found finished: neither file is written again (not even with fewer rows on the way)
    assert [(tmp_path / f).read_bytes() for f in ("results.json", "results.md")] == before


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


def readme_python(section: str) -> str:
    """The first python block under a README heading, within that heading's section."""
    body = (ROOT / "README.md").read_text()
    body = body[body.index(section):]
    return re.search(r"```python\n(.*?)```", body[:body.index("\n## ", 3)], re.S).group(1)


# appended to the README's commands in CI (argparse keeps the last value): small sizes only
SMALL = {"colour_digits.py": ["--train", "300", "--test", "100"], "natural_digits.py": ["--train", "300", "--test", "100"],
         "run": ["--profile", "tiny"], "train": ["--epochs", "1"],
         "reconstruct": ["--images", "20", "--batch-size", "10", "--steps", "2"],
         "export": ["--calibration-inputs", "16", "--check-inputs", "16"]}


def _in_process(argv, where, limit=900):
    """``dfkd.cli.main(argv)`` as the console script calls it, in ``where``: its exit code and stderr. The global
    RNG is forked (what a command seeds stays its own), a hang past ``limit`` s ends it (``TimeoutError``,
    which ``main`` reports as one line), and DFKD_TRACEBACK makes a failure show its traceback."""
    def expire(*_):
        raise TimeoutError(f"dfkd {argv[0]} ran past {limit} s")
    err, before = io.StringIO(), signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        with torch.random.fork_rng(devices=[]), contextlib.chdir(where), contextlib.redirect_stderr(err), \
                mock.patch.dict(os.environ, DFKD_TRACEBACK="1"):
            return main(argv), err.getvalue()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def run_readme(cmds, tmp_path):
    """Run README commands as written, at ``SMALL`` sizes, in ``tmp_path`` (the examples named by their path).
    Every ``dfkd`` command but the last runs through ``dfkd.cli.main`` in this process (``_in_process``), which
    spares each the seconds of importing torch again; the last, and the scripts, run as new processes (the
    console entry point's imports on their own)."""
    last = max(i for i, c in enumerate(cmds) if c[0] == "dfkd")
    for k, cmd in enumerate(cmds):
        name = cmd[1] if cmd[0] == "dfkd" else cmd[1].split("/")[-1]
        argv = [str(ROOT / a) if a.startswith("examples/") else a.replace("examples/", f"{ROOT}/examples/")
                if "examples/" in a and ":" in a else a for a in cmd[1:]] + SMALL.get(name, [])
        if cmd[0] == "dfkd" and k != last:
            code, err = _in_process(argv + ["--quiet"], tmp_path)
            assert code == 0, (cmd, err)
            continue
        argv = (["-m", "dfkd"] + argv + ["--quiet"]) if cmd[0] == "dfkd" else argv
        r = subprocess.run([sys.executable] + argv, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, (cmd, r.stderr)


def test_readme_teachers_without_batchnorm_run_as_written(tmp_path):
    """The README's ViT and GroupNorm commands, at tiny sizes: the publisher's records hold norm-stats, token
    layers per feature and the first layer per unit; each run picks all-layers+norm-stats, its report has
    the generator's row and grid, and its student is the student named."""
    from dfkd.metadata import load
    cmds = readme_commands("## Teachers without BatchNorm")
    assert [c[1] if c[0] == "dfkd" else c[1].split("/")[-1] for c in cmds] == \
        ["colour_digits.py", "train", "record", "run", "run", "train", "record", "run"]
    run_readme(cmds, tmp_path)
    runs = tmp_path / "runs"
    vit = load(runs / "vit" / "teacher.stats.safetensors")
    stats = {row["path"]: row["stat"] for row in vit.header["layers"]}
    assert stats["embed"] == "unit" and stats["blocks.0.att"] == "feature" and stats["head"] == "unit"
    assert vit.kinds[-2:] == ["norm-stats", "token-positions"] and [n["path"] for n in vit.header["norms"]][:2] == \
        ["blocks.0.norm1", "blocks.0.norm2"]
    gn = load(runs / "gn" / "teacher.stats.safetensors")
    assert gn.kinds[-1] == "norm-stats" and {n["type"] for n in gn.header["norms"]} == {"GroupNorm"}
    for out, student in (("vit-cnn", "own_model.py:student"), ("vit-vit", "vit.py:student"),
                         ("gn-cnn", "own_model.py:student")):
        res = json.loads((runs / out / "results.json").read_text())
        assert [row["objective"] for row in res["rows"]] == ["real-data", "real-kd", "all-layers+norm-stats"]
        assert {row["student"] for row in res["rows"]} == {f"{ROOT}/examples/{student}"}
        md = (runs / out / "results.md").read_text()
        assert "| all-layers+norm-stats (generator) |" in md and "MNIST" not in md
        assert (runs / out / "own" / "students" / "all-layers+norm-stats.samples.png").is_file()
        # no bn-stats: the per-unit record (the first layer) matched by the batch
        saved = json.loads((runs / out / "own" / "students" / "all-layers+norm-stats.json").read_text())
        assert saved["reconstruct_config"]["unit_targets"] == "batch"
        # the smaller ViT at its own learning rate (--lr 0.002), the small CNN at the default 0.01
        assert saved["distill_config"]["lr"] == (0.002 if out == "vit-vit" else 0.01)
    # the README's Python block, run for real at the same tiny sizes: the same student, figure by figure
    import dfkd
    block, real = readme_python("## Teachers without BatchNorm"), dfkd.run

    def tiny(cfg):  # the block's config at the tests' sizes, with the examples found where they are
        return real(dataclasses.replace(cfg, profile="tiny", progress=False, out="runs/vit-cnn-api",
                                        student=f"{ROOT}/{cfg.student}", code=tuple(f"{ROOT}/{c}" for c in cfg.code)))
    with mock.patch.object(dfkd, "run", tiny), contextlib.chdir(tmp_path), contextlib.redirect_stdout(io.StringIO()), \
            torch.random.fork_rng(devices=[]):
        exec(compile(block, "README.md", "exec"), {})
    cli, api = (json.loads((runs / out / "results.json").read_text())["rows"] for out in ("vit-cnn", "vit-cnn-api"))
    assert [r["objective"] for r in api] == [r["objective"] for r in cli] and len(api) == 3
    for a, c in zip(api, cli):
        assert (a["accuracy"], a["history"], a["configs"]) == (c["accuracy"], c["history"], c["configs"]), a["objective"]


def test_readme_natural_digits_run_as_written(tmp_path):
    """The README's commands "On photographs: the natural digits", at tiny sizes (the 800 epochs cut to 2): each
    publisher's record keeps its first layer per unit and norm-stats; each run makes its set in the Fourier basis,
    distils with backdrop views, and its student is the one named; no report says MNIST."""
    from dfkd.metadata import load
    cmds = readme_commands("### On photographs: the natural digits")
    assert [c[1] if c[0] == "dfkd" else c[1].split("/")[-1] for c in cmds] == \
        ["natural_digits.py", "train", "record", "train", "record", "train", "record", "run", "run", "run", "run"]
    assert sum("800" in c for c in cmds) == 3 and sum('{"norm": "layer"}' in c for c in cmds) == 1
    run_readme([c + ["--epochs", "2"] if c[:2] == ["dfkd", "run"] else c for c in cmds], tmp_path)
    runs = tmp_path / "runs"
    for teacher, norm in (("nat-vit", "LayerNorm"), ("nat-gn", "GroupNorm"), ("nat-ln", "LayerNorm")):
        meta = load(runs / teacher / "teacher.stats.safetensors")
        assert meta.header["layers"][0]["stat"] == "unit" and "norm-stats" in meta.kinds
        assert {n["type"] for n in meta.header["norms"]} == {norm}
    for out, student in (("nat-vit-cnn", "own_model.py:student"), ("nat-vit-vit", "vit.py:student"),
                         ("nat-gn-cnn", "own_model.py:student"), ("nat-ln-cnn", "own_model.py:student")):
        res = json.loads((runs / out / "results.json").read_text())
        assert [row["objective"] for row in res["rows"]] == ["all-layers+norm-stats"]
        assert res["rows"][0]["student"] == f"{ROOT}/examples/{student}"
        saved = json.loads((runs / out / "own" / "students" / "all-layers+norm-stats.json").read_text())
        assert saved["reconstruct_config"]["basis"] == "fourier"
        assert saved["distill_config"]["augment"] == "affine+cutmix+colour+backdrop"
        assert saved["distill_config"]["temperature"] == (4.0 if out == "nat-ln-cnn" else 8.0)
        assert "MNIST" not in (runs / out / "results.md").read_text()


def test_readme_python_run_is_the_commands_run(tmp_path, monkeypatch):
    """The README's Python ``dfkd.run`` under "Teachers without BatchNorm" hands ``run`` the very RunConfig that
    its first ``dfkd run`` command does through the command line (both captured where ``run`` is called, so
    neither runs): the API and the CLI run the same job."""
    import dfkd
    import dfkd.cli_commands as commands
    seen = []

    def capture(cfg):
        seen.append(cfg)
        (tmp_path / "results.md").write_text("")
        return tmp_path / "results.json"
    block = readme_python("## Teachers without BatchNorm")
    first_run = next(c for c in readme_commands("## Teachers without BatchNorm") if c[:2] == ["dfkd", "run"])
    assert dfkd.run is commands.run  # one function behind both
    monkeypatch.setattr(commands, "run", capture)
    assert main(first_run[1:]) == 0
    monkeypatch.setattr(dfkd, "run", capture)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(block, "README.md", "exec"), {})
    assert out.getvalue().strip() == str(tmp_path / "results.json")
    assert len(seen) == 2 and seen[0].student == "examples/own_model.py:student" and seen[0].synthesis == "generator"
    assert seen[1] == seen[0], (seen[1], seen[0])


def test_readme_cifar10_recipe_runs_as_written(tmp_path):
    """The README's CIFAR-10 recipe (ResNet-34 -> ResNet-18), as written but on the CPU, at a width of 4, on a few
    random images this test writes in CIFAR-10's python format where the commands read it: the teacher trained
    and recorded, the run's generator student is the README's ResNet-18, and the nets are the published pair's
    (their parameter counts, and the state-dict names the published codes use)."""
    from tests.test_data import _cifar_dir
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import cifar_resnet
    finally:
        sys.path.remove(str(ROOT / "examples"))
    counts = [sum(p.numel() for p in f().parameters()) for f in (cifar_resnet.resnet34, cifar_resnet.resnet18)]
    assert counts == [21_282_122, 11_173_962]
    keys = set(cifar_resnet.resnet18().state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
            "layer4.1.bn2.running_mean", "linear.weight", "linear.bias"} <= keys
    cmds = readme_commands("### CIFAR-10: the field's standard pair")
    assert [c[1] for c in cmds] == ["train", "record", "run"] and all(c[c.index("--device") + 1] == "cuda" for c in cmds)
    _cifar_dir(tmp_path / "data" / "cifar10")
    small = {"train": ["--model-args", '{"width": 4}'], "run": ["--student-args", '{"width": 4}', "--iterations", "4"]}
    cmds = [["cpu" if w == "cuda" else w for w in c] + small.get(c[1], []) for c in cmds]
    run_readme(cmds, tmp_path)
    res = json.loads((tmp_path / "runs" / "cifar-r18" / "results.json").read_text())
    assert [(r["objective"], r["student"]) for r in res["rows"]][-1] == \
        ("all-layers+bn-stats", f"{ROOT}/examples/cifar_resnet.py:resnet18")
    assert res["rows"][-1]["synthesis"] == "generator" and res["data"]["class_names"][0] == "airplane"
    # a teacher trained elsewhere: the same net as code and a weights file, recorded to --out, read with --stats
    given = ["--teacher", f"{ROOT}/examples/cifar_resnet.py:resnet34", "--teacher-args", '{"width": 4}', "--weights",
             "runs/cifar/teacher.safetensors", "--normalize", "auto"]
    code, err = _in_process(["record", *given, "--data", "cifar10:data/cifar10", "--first-layer", "unit", "--out",
                             "resnet34.stats.safetensors", "--quiet"], tmp_path)
    assert code == 0, err
    code, err = _in_process(["run", *given, "--stats", "resnet34.stats.safetensors", "--student",
                             f"{ROOT}/examples/cifar_resnet.py:resnet18", "--student-args", '{"width": 4}', "--data",
                             "cifar10:data/cifar10", "--synthesis", "generator", "--profile", "tiny", "--iterations", "2",
                             "--no-baselines", "--out", "runs/elsewhere", "--quiet"], tmp_path)
    assert code == 0, err
    rows = json.loads((tmp_path / "runs" / "elsewhere" / "results.json").read_text())["rows"]
    assert [r["objective"] for r in rows] == ["all-layers+bn-stats"]


def test_readme_deploy_section_runs_as_written(tmp_path):
    """The README's deploy commands at tiny sizes: the run ends with its data-free student as an int8 ONNX file
    whose accuracy the report states; dfkd export writes a float32 file that gives the student's own logits on
    raw colour images, an int8 file calibrated on the set's first 16 inputs and checked on the next 16, and
    those 16 inputs as the .npz."""
    import numpy as np

    from dfkd.checkpoint import load_model
    from dfkd.data import as_batches
    from dfkd.exporting import read_metadata
    from dfkd.inference import run_onnx, session
    from dfkd.sources import open_data
    from dfkd.synthetic import SyntheticSet
    cmds = readme_commands("## Deploy the student")
    assert [c[1] if c[0] == "dfkd" else c[1].split("/")[-1] for c in cmds] == \
        ["colour_digits.py", "run", "export", "export"]
    run_readme(cmds, tmp_path)
    out = tmp_path / "runs" / "deploy"
    row = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["objective"] == "all-layers+bn-stats"][0]
    test = open_data(f"folder:{tmp_path / 'data' / 'colour-digits'}")
    x, y = next(as_batches(test.test, len(test.test)))  # raw 0..1, 100 images
    students = out / "own" / "students"
    acc = (run_onnx(session(students / "all-layers+bn-stats.int8.onnx"), x).argmax(1) == y).float().mean().item()
    assert row["deploy"]["file"] == "all-layers+bn-stats.int8.onnx" and row["deploy"]["accuracy"] == pytest.approx(acc)
    assert f"| `all-layers+bn-stats.int8.onnx` | {100 * row['accuracy']:.2f} | {100 * acc:.2f} |" in \
        (out / "results.md").read_text()
    net, _, info = load_model(students / "all-layers+bn-stats", (str(ROOT / "examples" / "own_model.py"),))
    with torch.no_grad():
        want = net(info.to_model(x))
    assert (run_onnx(session(tmp_path / "student.onnx"), x) - want).abs().max().item() <= 1e-4
    sx, _, logits = SyntheticSet(out / "own" / "synthetic" / "all-layers+bn-stats").open().load()
    assert len(sx) == 40
    with np.load(tmp_path / "calibration.npz") as z:
        assert np.array_equal(z["x"], sx[:16].numpy()) and np.array_equal(z["teacher_label"], logits[:16].argmax(1).numpy())
    q = json.loads(read_metadata(tmp_path / "student.int8.onnx")["quantization"])
    assert q["calibration"]["inputs"] == 16 and q["check"]["n"] == 16 and q["check"]["inputs"] == "held apart"
    held = run_onnx(session(tmp_path / "student.int8.onnx"), sx[16:32]).argmax(1)
    assert q["check"]["int8"] == pytest.approx((held == logits[16:32].argmax(1)).float().mean().item(), abs=1e-6)


def test_readme_own_model_section_runs_as_written(tmp_path):
    """A user's own BN/residual teacher and GELU student on a colour image folder, from the README: one
    command. Its teacher has BatchNorm and the run records its statistics, so both objectives run; the
    report names the data, sets no paper figure beside it, and gives the command that makes it again,
    which, run again, finds every student finished and rewrites nothing."""
    cmds = readme_commands("## Your own model and data")
    assert [c[1] if c[0] == "dfkd" else c[1].split("/")[-1] for c in cmds] == ["colour_digits.py", "run"]
    examples = sorted(p.name for p in (ROOT / "examples").iterdir())
    run_readme(cmds, tmp_path)
    out = tmp_path / "runs" / "colour"
    # the teacher it trained and the statistics it recorded lie in the run's folder, nowhere beside the code
    assert (out / "own" / "teacher.stats.safetensors").is_file()
    assert sorted(p.name for p in (ROOT / "examples").iterdir()) == examples
    desc = json.loads((out / "own" / "teacher.json").read_text())
    assert desc["data"]["shape"] == [3, 32, 32] and len(desc["data"]["mean"]) == 3
    assert desc["model"]["spec"].endswith("own_model.py:teacher") and desc["model"]["args"] == {"in_channels": 3}
    res = json.loads((out / "results.json").read_text())
    assert [row["objective"] for row in res["rows"]] == ["real-data", "real-kd", "all-layers+bn-stats"]
    assert {row["student"] for row in res["rows"]} == {f"{ROOT}/examples/own_model.py:student"}
    # the student saved is the one in the table: its accuracy measured again by dfkd evaluate
    r = dfkd("evaluate", out / "own" / "students" / "all-layers+bn-stats", "--code", ROOT / "examples" / "own_model.py",
             "--json", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["accuracy"] == pytest.approx(res["rows"][-1]["accuracy"], abs=1e-12)
    md = (out / "results.md").read_text()
    assert md.startswith("# dfkd results: `folder:data/colour-digits` (10 classes: 0, 1, 2,")
    assert "MNIST" not in md and "paper" not in md
    grid = "own/students/all-layers+bn-stats.samples.png"  # what its generator makes
    assert f"]({grid})" in md and (out / grid).read_bytes().startswith(b"\x89PNG")
    assert (out / "own" / "students" / "all-layers+bn-stats.generator.safetensors").is_file()
    # bn-stats matches the batch already: the per-unit records keep the paper's draws (left out at the default)
    assert "unit_targets" not in json.loads((out / "own" / "students" / "all-layers+bn-stats.json").read_text())[
        "reconstruct_config"]
    assert "| all-layers+bn-stats (generator) |" in md
    assert "](curve.svg)" in md
    svg = (out / "curve.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3
    made = re.search(r"```\n(dfkd run .*)\n```", md).group(1)
    assert "--profile tiny" in made and "--normalize auto" in made and "--quiet" not in made
    assert "--synthesis generator" in made
    files = [out / "results.json", out / "results.md", out / "curve.svg"] + sorted((out / "own").rglob("*.json"))
    before = [f.read_bytes() for f in files]
    again = subprocess.run([sys.executable, "-m", "dfkd"] + shlex.split(made)[1:] + ["--quiet"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert again.returncode == 0, again.stderr
    assert [f.read_bytes() for f in files] == before


# --- how a run ends when the user stops it, or stops reading it -----------------------------------
def dfkd_one_thread(*args, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "dfkd", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600, preexec_fn=_sigint_default)


def _sigint_default():
    """SIGINT as a terminal delivers it, even where this test runs with it ignored (a shell's
    background job): Python then turns it into KeyboardInterrupt."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# a user's model that presses Ctrl-C (a real SIGINT to its own process) at its first real batch:
# deterministic, with no clock in it (dfkd's own probe of the model runs two inputs)
CTRL_C = """import os
import signal

from torch import nn


class Net(nn.Sequential):
    def forward(self, x):
        if len(x) >= 8:
            os.kill(os.getpid(), signal.SIGINT)
        return super().forward(x)


def make():
    return Net(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
"""


@pytest.mark.parametrize("verb, says", [
    ("train", "dfkd: train: interrupted; run the same command again to resume from its last finished epoch"),
    ("record", "dfkd: record: interrupted; record is one pass and does not resume: run the same command again "
               "to start over"),
])
def test_ctrl_c_says_truthfully_whether_the_work_resumes(verb, says, tmp_path, idx_dir):
    """A real SIGINT in a real ``python -m dfkd`` process: one line saying what running the command
    again does (train resumes per epoch; record is one pass and starts over), exit 130."""
    (tmp_path / "ctrlc.py").write_text(CTRL_C)
    spec, data = f"{tmp_path / 'ctrlc.py'}:make", f"idx:{idx_dir}"
    argv = {"train": ["train", "--model", spec, "--data", data, "--out", tmp_path, "--name", "m", "--epochs", "1"],
            "record": ["record", "--teacher", spec, "--weights", "random", "--data", data,
                       "--out", tmp_path / "m.stats.safetensors"]}[verb]
    r = dfkd_one_thread(*argv, "--quiet")
    assert (r.returncode, r.stderr) == (130, says + "\n")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.stats.safetensors").exists()


@pytest.mark.parametrize("verb", ["train", "record", "reconstruct", "distill", "evaluate", "run", "leakage",
                                  "publish", "inspect", "export"])
def test_ctrl_c_line_of_every_verb(verb, monkeypatch, capsys):
    """Each verb's line after Ctrl-C: those that resume (docs/robustness.md: train, distill per epoch,
    reconstruct per shard, run per step) say so; the others say that a second run starts over."""
    from dfkd import cli, cli_commands

    def interrupted(a):
        raise KeyboardInterrupt

    assert verb in cli_commands.COMMANDS  # (setitem would add a missing verb)
    monkeypatch.setitem(cli_commands.COMMANDS, verb, interrupted)
    argv = {"record": ["--teacher", "t"], "reconstruct": ["--teacher", "t"], "distill": ["--synthetic", "s", "--out", "o"],
            "evaluate": ["m"], "leakage": ["--teacher", "t"], "publish": ["--teacher", "t", "--out", "o"],
            "inspect": ["f"], "export": ["m", "--out", "o.onnx"]}.get(verb, [])
    assert cli.main([verb, *argv]) == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dfkd: {verb}: interrupted; ")
    if verb in ("train", "distill", "reconstruct", "run"):
        assert "again to resume" in line
    else:
        assert "start over" in line and "to resume" not in line


def test_every_verb_of_the_parser_has_a_command_and_back():
    """The parser's verbs and ``cli_commands.COMMANDS`` are two tables: they name the same verbs."""
    import argparse
    from dfkd import cli_commands
    from dfkd.cli_parser import build_parser
    (verbs,) = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(verbs) == set(cli_commands.COMMANDS)


def test_a_reader_that_goes_away_ends_dfkd_quietly(world):
    """``dfkd inspect FILE | head``: the reader goes away before dfkd has written all it prints; dfkd
    stops quietly with exit 141 (as a tool killed by SIGPIPE), with no 'Broken pipe' line and no
    traceback. Here the reader has closed the pipe before dfkd writes a byte: the same, with no timing."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = dfkd_one_thread("inspect", world.stats, stdout=w)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, "")


def test_error_in_the_code_of_an_installed_package_is_the_users(world, tmp_path, capsys, monkeypatch):
    """``--model package.module:factory`` whose package is installed (under sys.prefix, where pip puts
    it, as torch is): an error raised in its forward is the user's code (its file and line, exit 2),
    not 'a dfkd bug' (exit 1)."""
    from dfkd.cli import main
    pkg = tmp_path / "lib" / "site-packages" / "dfkd_test_userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from torch import nn\n\n\nclass Net(nn.Linear):\n    def forward(self, x):\n"
                                 "        raise ValueError('my layer is misconfigured')\n\n\n"
                                 "def make():\n    return Net(784, 10)\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # the environment holding torch stays installed code
    monkeypatch.setattr(sys, "prefix", str(tmp_path))    # and so is the user's package
    try:
        code = main(["train", "--model", "dfkd_test_userpkg.nets:make", "--data", world.data, "--out",
                     str(tmp_path / "o"), "--epochs", "1", "--quiet"])
    finally:
        for name in [n for n in sys.modules if n.startswith("dfkd_test_userpkg")]:
            del sys.modules[name]
    (line,) = capsys.readouterr().err.splitlines()
    assert code == 2 and line.startswith(f"dfkd: {pkg / 'nets.py'}:6: ValueError: my layer is misconfigured"), line
    assert "in your code" in line


def test_devices_this_machine_lacks_are_refused(monkeypatch):
    """A device torch knows but this machine lacks is one line before anything moves to it: a CUDA
    index past the machine's GPUs (here a machine made to report two), mps or xpu without them."""
    from dfkd.errors import DfkdError
    from dfkd.runtime import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1") and pick_device("cpu") == torch.device("cpu")
    with pytest.raises(DfkdError, match="cuda:3 was asked for but this machine has 2 CUDA device"):
        pick_device("cuda:3")
    for name, available in (("mps", torch.backends.mps.is_available()), ("xpu", torch.xpu.is_available())):
        if not available:
            with pytest.raises(DfkdError, match=f"no {name} device"):
                pick_device(name)
