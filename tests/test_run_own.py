"""``dfkd run`` on a user's own teacher and student: the recipe follows from what the teacher offers
(BatchNorm and a statistics file, BatchNorm alone, a statistics file alone), a given teacher is used as it
is (its statistics read, never recorded), and its accuracy in the table is the one it was trained to.
(The README's one command, where the run trains the teacher: tests/test_cli.py; refusals:
tests/test_bad_input.py.)"""
import json
import shlex
from dataclasses import replace as dataclass_replace
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from dfkd.cli import main
from dfkd.config import RecordConfig, TrainConfig
from dfkd.evaluation import evaluate_file
from dfkd.recipes import OWN as OWN_RECIPES
from dfkd.recording import record_file
from dfkd.sources import data_sha256
from dfkd.specs import DataRef, ModelRef
from dfkd.training import train_file
from tests.conftest import OWN

ARGS = '{"in_channels": 3, "width": 4}'


@pytest.fixture(scope="module")
def own(tmp_path_factory, colour_dir):
    """The user's BN teacher and a plain (no BatchNorm) one, trained 1 epoch on the colour folder with
    --normalize auto; only the plain one has its statistics recorded."""
    d = tmp_path_factory.mktemp("own")
    data = DataRef(f"folder:{colour_dir}", normalize="auto")
    for name in ("teacher", "student"):
        train_file(ModelRef(f"{OWN}:{name}", args=json.loads(ARGS)), data, d / name, TrainConfig(epochs=1))
    record_file(ModelRef(str(d / "student"), code=(str(OWN),)), DataRef(), None, RecordConfig())
    return d, f"folder:{colour_dir}"


def run(tmp, *args, baselines=False, student_args=ARGS, code=0):
    got = main(["run", "--profile", "tiny", "--student", f"{OWN}:student", "--student-args", student_args, "--quiet",
                "--out", str(tmp), *map(str, args)] + ([] if baselines else ["--no-baselines"]))
    assert got == code
    return json.loads((tmp / "results.json").read_text())["rows"] if code == 0 else None


def test_given_weights_without_statistics_run_bn_stats_and_record_nothing(own, tmp_path):
    """A BN teacher given as code and weights, no statistics file beside them: bn-stats alone, and no
    statistics file written. The table's teacher accuracy is the one it was trained to: the same weights
    behind the same normalisation (recomputed by --normalize auto), on the same test split."""
    d, data = own
    rows = run(tmp_path, "--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--weights", d / "teacher.safetensors",
               "--normalize", "auto", "--data", data)
    assert [r["objective"] for r in rows] == ["bn-stats"]
    assert not (d / "teacher.stats.safetensors").exists() and not list(tmp_path.rglob("*.stats.safetensors"))
    trained = json.loads((d / "teacher.json").read_text())["test_accuracy"]
    assert rows[0]["teacher_accuracy"] == pytest.approx(trained, abs=1e-12)
    assert rows[0]["seconds"]["teacher_train"] == 0.0  # used as it is, not trained again


@pytest.mark.parametrize("change", [("--normalize", "none"), ("--student-args", '{"in_channels": 3, "width": 5}'),
                                    ("--teacher-args", '{"in_channels": 3, "width": 4, "num_classes": 10}')])
def test_a_resumed_own_run_with_other_settings_is_refused(own, tmp_path, capsys, change):
    """The same output folder, one flag changed (the normalisation, the student's or the teacher's arguments):
    the finished student is not taken for this run's; the run is refused in one line, and its files are kept."""
    d, data = own
    given = ["--teacher", f"{OWN}:teacher", "--weights", d / "teacher.safetensors", "--data", data]
    args = dict(zip(("--normalize", "--student-args", "--teacher-args"), ("auto", ARGS, ARGS)))
    run(tmp_path, *given, "--normalize", args["--normalize"], "--teacher-args", args["--teacher-args"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".lock" not in p.name}
    capsys.readouterr()
    args[change[0]] = change[1]
    run(tmp_path, *given, "--normalize", args["--normalize"], "--teacher-args", args["--teacher-args"],
        student_args=args["--student-args"], code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfkd: ") and "other settings" in err[0] and "--restart" in err[0], err
    assert {p: p.read_bytes() for p in before} == before


def test_a_run_resumed_with_its_recipe_spelt_as_flags_keeps_its_work_and_wall_time(own, tmp_path, capsys):
    """A finished run given the recipe it was made with as flags (what a run made before a recipe's default
    changed is resumed with): nothing is made again, the report keeps its rows and the wall time they took and
    gives the command as now spelt; flags that differ are refused naming the flag (``n`` is ``--images``)."""
    d, data = own
    given = ["--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--weights", d / "teacher.safetensors",
             "--normalize", "auto", "--data", data]
    rows = run(tmp_path, *given)
    first = json.loads((tmp_path / "results.json").read_text())
    models = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".safetensors"}
    capsys.readouterr()
    run(tmp_path, *given, "--images", 41, code=2)  # tiny: 40 x 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n (--images) 40 -> 41" in err[0] and "give the settings it was made with" in err[0]
    assert run(tmp_path, *given, "--images", 40, "--steps", 5) == rows
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["wall_seconds"] == first["wall_seconds"] and (again["config"]["images"], again["config"]["steps"]) == (40, 5)
    md = (tmp_path / "results.md").read_text()
    assert f"wall time so far: {first['wall_seconds']:.0f} s" in md and "--images 40 --steps 5" in md
    assert {p: p.read_bytes() for p in models} == models


def test_a_statistics_file_beside_a_bn_teacher_adds_the_metadata_objective(own, tmp_path):
    """The same teacher, its statistics recorded beside it (the publisher's file): both objectives, the
    synthetic set made from that very file, which the run leaves as it was."""
    d, data = own
    stats = d / "teacher.stats.safetensors"
    record_file(ModelRef(str(d / "teacher"), code=(str(OWN),)), DataRef(), None, RecordConfig())
    before = stats.read_bytes()
    try:
        rows = run(tmp_path, "--teacher", d / "teacher", "--code", OWN, "--data", data)
        assert [r["objective"] for r in rows] == ["all-layers+bn-stats"]
        manifest = json.loads((tmp_path / "own" / "synthetic" / "all-layers+bn-stats" / "manifest.json").read_text())
        with safe_open(str(stats), "pt") as f:  # read here with safetensors itself
            assert manifest["stats_sha256"] == json.loads(f.metadata()["dfkd"])["tensors_sha256"]
        assert stats.read_bytes() == before
    finally:
        stats.unlink()  # the other tests' teacher has none


def test_a_teacher_without_batchnorm_runs_on_its_statistics(own, tmp_path):
    """A teacher with no BatchNorm layer and its statistics file (given with --stats): all-layers alone."""
    d, data = own
    stats = d / "student.stats.safetensors"
    rows = run(tmp_path, "--teacher", d / "student", "--code", OWN, "--stats", stats, "--data", data, baselines=True)
    assert [r["objective"] for r in rows] == ["real-data", "real-kd", "all-layers"]
    assert rows[0]["teacher_accuracy"] == pytest.approx(json.loads((d / "student.json").read_text())["test_accuracy"],
                                                        abs=1e-12)
    manifest = json.loads((tmp_path / "own" / "synthetic" / "all-layers" / "manifest.json").read_text())
    with safe_open(str(stats), "pt") as f:
        assert manifest["stats_sha256"] == json.loads(f.metadata()["dfkd"])["tensors_sha256"]
    assert rows[-1]["colour"]["views"] == "kept"  # so the teacher sees the student's colour views too (below)
    assert manifest["config"]["views"] == "affine+colour"  # the teacher saw each input under the student's views
    # the baselines: the same student on the real images, for the profile's distillation epochs (not optimise's) at its lr
    for name in ("real-data", "real-kd"):
        config = json.loads((tmp_path / "own" / "students" / f"{name}.json").read_text())["settings"]["config"]
        assert (config["epochs"], config["lr"]) == (OWN_RECIPES["tiny"]["distill"]["epochs"], 0.01)


def test_a_file_without_all_layers_serves_the_objective_its_kinds_do(own, tmp_path):
    """The same no-BatchNorm teacher with a file holding the top-layer record alone: top-layer, not a refusal."""
    d, data = own
    stats = tmp_path / "top.stats.safetensors"
    record_file(ModelRef(str(d / "student"), code=(str(OWN),)), DataRef(), stats, RecordConfig(kinds=("top-layer",)))
    rows = run(tmp_path / "run", "--teacher", d / "student", "--code", OWN, "--stats", stats, "--data", data)
    assert [r["objective"] for r in rows] == ["top-layer"]


def test_the_paper_networks_settings_are_those_runs_made_before(tmp_path):
    """A registry pair's resume settings (what an earlier run's students and teacher were saved with) are
    spelt as the run spelt them before own pairs: the same configs, keys and values, so its runs resume."""
    from dfkd.config import DistillConfig, ReconstructConfig
    from dfkd.run_config import RunConfig
    from dfkd.students import student_settings
    from dfkd.profiles import pairs
    from dfkd.recipes import PROFILES
    from dfkd.resume import config_settings
    cfg = RunConfig(out=str(tmp_path))
    p = PROFILES["quick"]
    for pair in pairs(cfg):
        net = pair.name
        desc, meta = {"sha256": "t" * 64}, SimpleNamespace(header={"tensors_sha256": "s" * 64})
        rc = ReconstructConfig(**dict(p["recipe"][net], objective="all-layers", batch_size=p["batch_size"], seed=1))
        dc = DistillConfig(**dict(p["distill"], seed=1))
        assert student_settings("all-layers", pair, 1, cfg, desc, meta) == {
            "verb": "run-student", "student": {"lenet5": "lenet5-half", "hinton-1200": "hinton-800"}[net],
            "objective": "all-layers", "seed": 1, "data": data_sha256("mnist"), "teacher_sha256": "t" * 64,
            "config": config_settings(dc), "reconstruct": config_settings(rc), "stats_sha256": "s" * 64}
        base = student_settings("real-data", pair, 0, cfg, desc, meta)
        assert base["config"] == config_settings(TrainConfig(epochs=p["baseline_epochs"][net], seed=0))
        kd = student_settings("real-kd", pair, 0, cfg, desc, meta)
        assert kd["config"] == config_settings(DistillConfig(epochs=p["baseline_epochs"][net], augment="affine",
                                                             schedule="cosine", seed=0))


def test_an_own_pairs_optimised_set_is_distilled_longer_than_its_baselines_train(tmp_path):
    """Under --synthesis optimise the own pair's set is ``optimise_recipe``'s size (quick: 3,000 x 120) and its
    student takes ``optimise_distill`` (100 epochs, cosine), the baselines the distillation's own 30; the
    generator keeps the recipe and distillation as they were (its saved settings, so its runs resume); --images,
    --steps and --epochs override them (--epochs the student's and the baselines' alike)."""
    from dfkd.config import DistillConfig
    from dfkd.run_config import RunConfig
    from dfkd.profiles import configs, pairs
    own = dict(teacher="t.py:net", weights="w.safetensors", student="s.py:net")
    before = dict(epochs=30, batch_size=64, lr=0.01, augment="affine+cutmix+colour")  # the settings runs were saved with
    (p,) = pairs(RunConfig(**own))
    assert p.distill == dict(before, epochs=100, schedule="cosine", eval_every=10) and p.student_epochs == 30
    assert (p.recipe["n"], p.recipe["steps"], p.recipe["views"]) == (3000, 120, "affine+colour")
    cfg = RunConfig(**own, synthesis="generator")
    (g,) = pairs(cfg)
    assert g.distill == before and g.student_epochs == 30
    assert (g.recipe["n"], g.recipe["steps"], g.recipe["views"]) == (2000, 200, "none")  # as its runs were saved
    (s,) = pairs(RunConfig(**own, images=500, steps=7))
    assert (s.recipe["n"], s.recipe["steps"]) == (500, 7)
    (f,) = pairs(RunConfig(**own, basis="fourier"))  # --basis: the optimised inputs' basis, in the student's config
    assert configs("all-layers", f, 0, RunConfig(**own, basis="fourier"))[0].basis == "fourier" and "basis" not in p.recipe
    assert configs("all-layers", g, 3, cfg)[1] == DistillConfig(**before, seed=3)  # its runs resume
    (e,) = pairs(RunConfig(**own, epochs=7))
    assert (e.distill["epochs"], e.distill["schedule"], e.student_epochs) == (7, "cosine", 7)
    (t,) = pairs(RunConfig(**own, profile="tiny"))
    assert (t.distill["epochs"], t.distill["schedule"], t.student_epochs) == (1, "cosine", 1)
    # results.json states each mode's recipe: the generator's without the optimise mode's entries
    from dfkd.results import write_results
    for synthesis, has in (("generator", False), ("optimise", True)):
        write_results(tmp_path / synthesis, [], RunConfig(**own, synthesis=synthesis), 0.0)
        profile = json.loads((tmp_path / synthesis / "results.json").read_text())["profile"]
        assert ("optimise_recipe" in profile, "optimise_distill" in profile, "generator_recipe" in profile) == \
            (has, has, True)


def test_generator_synthesis_runs_the_same_objective_and_saves_its_generator(own, tmp_path, capsys):
    """--synthesis generator on a given BN teacher (bn-stats: no statistics file): the student is distilled on a
    generator's batches, the generator saved beside it (loadable, of the data's shape and range, its grid in the
    report), the table names the mode, the report's command makes the run again (rewriting nothing), and the same
    folder with the other mode is refused as other settings."""
    from dfkd.generation import load_generator
    d, data = own
    given = ["--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--weights", d / "teacher.safetensors",
             "--normalize", "auto", "--data", data]
    rows = run(tmp_path, *given, "--synthesis", "generator", "--iterations", "3")
    assert [(r["objective"], r["synthesis"]) for r in rows] == [("bn-stats", "generator")]
    assert rows[0]["image_steps"] == 3 * 16 and rows[0]["student_steps"] == 3 and rows[0]["seconds"]["generate"] > 0
    assert rows[0]["history_epochs"] == [2, 3]  # every eval_every steps (tiny: 2) and the last
    gen, doc = load_generator(tmp_path / "own" / "students" / "bn-stats.generator.safetensors")
    assert gen.shape == (3, 32, 32) and doc["objective"] == "bn-stats" and not gen.anchored
    saved = json.loads((tmp_path / "own" / "students" / "bn-stats.json").read_text())
    assert "views" not in saved["reconstruct_config"]  # the generator's recipe: no seen views
    # its recipe as results.json states it: the generator's, not the optimise mode's distillation
    profile = json.loads((tmp_path / "results.json").read_text())["profile"]
    assert "optimise_distill" not in profile and profile["generator"]["iterations"] == 3
    md = (tmp_path / "results.md").read_text()
    assert "| bn-stats (generator) |" in md and "](own/students/bn-stats.samples.png)" in md
    assert (tmp_path / "own" / "students" / "bn-stats.samples.png").read_bytes().startswith(b"\x89PNG")
    made = md.split("```\n")[1].split("\n")[0]
    assert "--synthesis generator" in made and "--iterations 3" in made
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".svg")}
    assert main(shlex.split(made)[1:] + ["--quiet"]) == 0
    assert {p: p.read_bytes() for p in before} == before
    capsys.readouterr()
    assert main(["run", "--profile", "tiny", "--student", f"{OWN}:student", "--student-args", ARGS, "--quiet",
                 "--out", str(tmp_path), "--no-baselines", *map(str, given)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_teacher_epochs_sets_the_epochs_of_the_teacher_the_run_trains(own, tmp_path, capsys):
    """--teacher-epochs: the teacher a run trains (the user's, given as code without weights) is trained that many
    epochs, which its saved history shows; the report's command names the flag; the same folder with another count
    is refused as other settings, its files kept. Without the flag a pair keeps its profile's count."""
    from dfkd.run_config import RunConfig
    from dfkd.profiles import pairs
    from dfkd.recipes import PROFILES
    d, data = own
    given = ["--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--normalize", "auto", "--data", data,
             "--objectives", "bn-stats"]
    rows = run(tmp_path, *given, "--teacher-epochs", 2)
    saved = json.loads((tmp_path / "own" / "teacher.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2] and rows[0]["seconds"]["teacher_train"] > 0
    assert "--teacher-epochs 2" in (tmp_path / "results.md").read_text()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".lock" not in p.name}
    capsys.readouterr()
    run(tmp_path, *given, "--teacher-epochs", 3, code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "epochs 2 -> 3" in err[0], err
    assert {p: p.read_bytes() for p in before} == before
    assert json.loads((tmp_path / "results.json").read_text())["profile"]["teacher_epochs"] == 2
    own_pair = dict(teacher="t.py:net", student="s.py:net")
    assert pairs(RunConfig(**own_pair))[0].teacher_epochs == OWN_RECIPES["quick"]["teacher_epochs"] == 3
    assert pairs(RunConfig(**own_pair, teacher_epochs=7))[0].teacher_epochs == 7
    assert [p.teacher_epochs for p in pairs(RunConfig())] == [PROFILES["quick"]["teacher_epochs"]] * 2
    assert [p.teacher_epochs for p in pairs(RunConfig(teacher_epochs=4))] == [4, 4]


def test_temperature_sets_the_data_free_students_kd_temperature(own, tmp_path, capsys):
    """--temperature: the data-free student is distilled at it (its saved settings), the real-KD baseline keeps
    its own recipe's 8, the report's command names the flag, and the same folder without it is refused as other
    settings, its files kept. Every pair and both modes take it; the paper profile refuses any but the paper's 8,
    and what is not a number in (0, 1000] is refused from Python in one line (the command line's: test_bad_input)."""
    from dfkd.run_config import RunConfig
    from dfkd.errors import DfkdError
    from dfkd.profiles import configs, pairs
    d, data = own
    given = ["--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--weights", d / "teacher.safetensors",
             "--normalize", "auto", "--data", data, "--objectives", "bn-stats"]
    run(tmp_path, *given, "--temperature", 4, baselines=True)
    students = tmp_path / "own" / "students"
    assert json.loads((students / "bn-stats.json").read_text())["distill_config"]["temperature"] == 4.0
    assert json.loads((students / "real-kd.json").read_text())["settings"]["config"]["temperature"] == 8.0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["temperature"] == 4.0
    assert "--temperature 4.0" in (tmp_path / "results.md").read_text()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".lock" not in p.name}
    capsys.readouterr()
    run(tmp_path, *given, baselines=True, code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "temperature 4.0 -> 8.0" in err[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".lock" not in p.name} == before
    own_pair = dict(teacher="t.py:net", weights="w.safetensors", student="s.py:net")
    for cfg in (RunConfig(**own_pair, temperature=2.0), RunConfig(**own_pair, temperature=2.0, synthesis="generator"),
                RunConfig(networks=("lenet5",), temperature=2.0), RunConfig(networks=("hinton-1200",), profile="best",
                                                                            temperature=2.0)):
        (p,) = pairs(cfg)
        assert configs("all-layers", p, 0, cfg)[1].temperature == 2.0
        assert configs("real-kd", p, 0, cfg)[0].temperature == 8.0
        assert configs("all-layers", pairs(dataclass_replace(cfg, temperature=None))[0], 0, cfg)[1].temperature == 8.0
    assert pairs(RunConfig(networks=("lenet5",), profile="paper", temperature=8.0))
    with pytest.raises(DfkdError, match="the paper's temperature, 8"):
        pairs(RunConfig(networks=("lenet5",), profile="paper", temperature=4.0))
    assert pairs(RunConfig(**own_pair, temperature=1000))[0].distill["temperature"] == 1000
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e200, 1000.5, True, "4"):
        with pytest.raises(DfkdError, match="is not a number > 0 and <= 1000") as e:
            pairs(RunConfig(**own_pair, temperature=bad))
        assert e.value.where == "temperature"


def test_lr_sets_the_students_learning_rate_and_a_resume_with_another_is_refused(own, tmp_path, capsys, monkeypatch):
    """--lr: the data-free student and, for a user's own pair, both baselines are trained at it: every Adam the
    run builds for a student starts at it (a spy on torch.optim.Adam; the generator's own Adam group keeps its
    1e-3), and their saved settings say so; the report's command names it, the student's weights differ from the
    same run's at the profile's lr, and the same folder without it is refused as other settings, its files kept.
    The paper's networks take it for their data-free students only (their baselines keep 1e-3), the paper
    profile refuses any but its 1e-3, and what is not a finite number > 0 whose Adam first step fits in float32
    is refused from Python in one line (the command line's: test_bad_input)."""
    import numpy as np
    from safetensors.torch import load_file

    from dfkd.errors import DfkdError
    from dfkd.profiles import configs, pairs
    from dfkd.run_config import RunConfig
    d, data = own
    given = ["--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--weights", d / "teacher.safetensors",
             "--normalize", "auto", "--data", data, "--objectives", "bn-stats"]
    made = []

    class Spy(torch.optim.Adam):
        def __init__(self, params, *a, **kw):
            super().__init__(params, *a, **kw)
            made.append([g["lr"] for g in self.param_groups])

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    run(tmp_path / "a", *given, "--lr", 0.003, baselines=True)
    # one group each: real-data, real-kd, the bn-stats student; the inputs' Adam (reconstruction, colour probe)
    # keeps one group per colour channel at the recipe's rates: the very groups of run b, made without --lr
    assert [m for m in made if len(m) == 1] == [[0.003]] * 3, made
    inputs = [m for m in made if len(m) != 1]
    assert inputs and all(len(m) == 3 for m in inputs), made
    made.clear()
    run(tmp_path / "g", *given, "--lr", 0.003, "--synthesis", "generator")
    assert [m for m in made if len(m) != 3] == [[1e-3, 0.003]], made  # the generator's group, the student's
    made.clear()
    students = tmp_path / "a" / "own" / "students"
    assert json.loads((students / "bn-stats.json").read_text())["distill_config"]["lr"] == 0.003
    for base in ("real-data", "real-kd"):
        assert json.loads((students / f"{base}.json").read_text())["settings"]["config"]["lr"] == 0.003
    assert "--lr 0.003" in (tmp_path / "a" / "results.md").read_text()
    run(tmp_path / "b", *given)
    assert [m for m in made if len(m) == 1] == [[0.01]], made
    assert [m for m in made if len(m) != 1] == inputs, made
    weights = [load_file(tmp_path / k / "own" / "students" / "bn-stats.safetensors") for k in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file() and ".lock" not in p.name}
    capsys.readouterr()
    run(tmp_path / "a", *given, baselines=True, code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "lr 0.003 -> 0.01" in err[0], err
    assert {p: p.read_bytes() for p in before} == before
    own_pair = dict(teacher="t.py:net", weights="w.safetensors", student="s.py:net")
    for cfg, base in ((RunConfig(**own_pair, lr=0.002), 0.002), (RunConfig(**own_pair, lr=0.002, synthesis="generator"), 0.002),
                      (RunConfig(networks=("lenet5",), lr=0.002), 1e-3)):
        (p,) = pairs(cfg)
        assert configs("all-layers", p, 0, cfg)[1].lr == 0.002
        assert configs("real-kd", p, 0, cfg)[0].lr == configs("real-data", p, 0, cfg)[0].lr == base
    assert pairs(RunConfig(**own_pair))[0].distill["lr"] == 0.01
    assert pairs(RunConfig(**own_pair, lr=np.float64(0.002)))[0].distill["lr"] == 0.002
    assert type(pairs(RunConfig(**own_pair, lr=np.float32(0.5)))[0].distill["lr"]) is float
    assert pairs(RunConfig(**own_pair, lr=3.4e37))[0].distill["lr"] == 3.4e37  # 10 * lr still fits in float32
    with pytest.raises(DfkdError, match="is too large: Adam's first step"):  # 10 * 3.41e37 does not
        pairs(RunConfig(**own_pair, lr=3.41e37))
    assert pairs(RunConfig(networks=("lenet5",), profile="paper", lr=1e-3))
    with pytest.raises(DfkdError, match="the paper profile distils at the paper's learning rate"):
        pairs(RunConfig(networks=("lenet5",), profile="paper", lr=0.002))
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.1", 1e38):
        why = "is too large: Adam's first step" if bad == 1e38 else "is not a finite number > 0"
        with pytest.raises(DfkdError, match=why) as e:
            pairs(RunConfig(**own_pair, lr=bad))
        assert e.value.where == "lr"


def test_augment_sets_the_data_free_students_views_and_keeps_them_as_given(own, tmp_path):
    """--augment: the data-free student is distilled on the views given, kept as given where --colour drops the
    profile's (its seen views lose their recolouring, the given views keep theirs), the real-KD baseline keeps its
    own recipe's affine views, and the report's command names the flag. Every pair and both modes take it (the
    refusals: test_bad_input)."""
    from dfkd.run_config import RunConfig
    from dfkd.profiles import configs, pairs
    d, data = own
    views = "affine+cutmix+colour+backdrop"
    run(tmp_path, "--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--weights", d / "teacher.safetensors",
        "--normalize", "auto", "--data", data, "--objectives", "bn-stats", "--colour", "drop", "--augment", views,
        baselines=True)
    students = tmp_path / "own" / "students"
    assert json.loads((students / "bn-stats.json").read_text())["distill_config"]["augment"] == views
    assert json.loads((students / "real-kd.json").read_text())["settings"]["config"]["augment"] == "affine"
    made = json.loads((tmp_path / "own" / "synthetic" / "bn-stats" / "manifest.json").read_text())["config"]
    assert made["views"] == "affine"  # the profile's seen views, dropped by --colour drop
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = [r for r in results["rows"] if r["objective"] == "bn-stats"]
    assert results["config"]["augment"] == views and row["colour"]["of"] == ["seen views"]
    assert f"--augment {views}" in (tmp_path / "results.md").read_text()
    own_pair = dict(teacher="t.py:net", weights="w.safetensors", student="s.py:net")
    for cfg in (RunConfig(**own_pair, augment="shift"), RunConfig(**own_pair, augment="shift", synthesis="generator"),
                RunConfig(networks=("lenet5",), augment="shift"),
                RunConfig(networks=("hinton-1200",), profile="best", augment="shift")):
        (p,) = pairs(cfg)
        assert configs("all-layers", p, 0, cfg)[1].augment == "shift"
        assert configs("real-kd", p, 0, cfg)[0].augment == "affine"
        profile = pairs(dataclass_replace(cfg, augment=None))[0]
        assert configs("all-layers", profile, 0, cfg)[1].augment == ("affine+cutmix+colour" if cfg.student else
                                                                     "affine+cutmix")  # the profile's
    assert pairs(RunConfig(networks=("lenet5",), profile="paper", augment="none"))


def test_average_keeps_the_data_free_students_mean_weights_and_leaves_the_baselines_alone(own, tmp_path):
    """--average: the data-free student kept is its weights' mean over the last share of the epochs (both
    accuracies logged while it is made, the average's the row's); the real-KD baseline keeps its last epoch's; the
    report's command names the flag."""
    d, data = own
    run(tmp_path, "--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--weights", d / "teacher.safetensors",
        "--normalize", "auto", "--data", data, "--objectives", "bn-stats", "--epochs", 4, "--average", 0.5,
        baselines=True)
    students = tmp_path / "own" / "students"
    made = json.loads((students / "bn-stats.json").read_text())
    assert made["distill_config"]["average"] == 0.5
    (row,) = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["objective"] == "bn-stats"]
    assert row["history_epochs"] == [1, 2, 3, 4] and row["running"]["epochs"] == [3, 4]  # epochs 3 and 4 averaged
    assert row["accuracy"] == row["history"][-1] == made["test_accuracy"]
    saved = evaluate_file(ModelRef(str(students / "bn-stats"), code=(str(OWN),)), DataRef(data))  # the file itself
    assert saved["accuracy"] == pytest.approx(row["accuracy"], abs=1e-9)
    kd = json.loads((students / "real-kd.json").read_text())
    assert "average" not in kd["settings"]["config"] and "running" not in kd["row"]
    report = (tmp_path / "results.md").read_text()
    assert "--average 0.5" in report
    assert (f"bn-stats seed 0: the mean of its weights after each of epochs 3 to 4 (--average 0.5); the last epoch's "
            f"own weights: {100 * row['running']['accuracy'][-1]:.2f}%.") in report


def test_an_own_pair_on_vectors_runs_end_to_end_with_its_baselines(tmp_path):
    """A user's MLP pair on an npz of vectors (20 features, 2 classes, a test split): every student is made and
    measured; the profile's image views (not given by the user) pass the vectors through, as documented."""
    import numpy as np
    (tmp_path / "mlp.py").write_text("from torch import nn\n\n\ndef net(hidden: int = 16):\n"
                                     "    return nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 2))\n")
    g = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = (g.normal(size=(60, 20)) + y[:, None] * 1.5).astype(np.float32)
    np.savez(tmp_path / "v.npz", x=x[:40], y=y[:40], x_test=x[40:], y_test=y[40:])
    assert main(["run", "--profile", "tiny", "--teacher", f"{tmp_path / 'mlp.py'}:net", "--student",
                 f"{tmp_path / 'mlp.py'}:net", "--student-args", '{"hidden": 8}', "--data", f"npz:{tmp_path / 'v.npz'}",
                 "--quiet", "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    assert [r["objective"] for r in rows][:2] == ["real-data", "real-kd"] and len(rows) >= 3
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[1]["configs"]["distill"]["augment"] == "affine"  # the baseline's own views, passed through
