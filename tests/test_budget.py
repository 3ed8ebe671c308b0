"""``dfkd run --minutes``: the inputs sized to a time budget from costs measured on this machine (``budget``).
The sizing is checked against a search over every size, the measurement against a clock whose readings are known,
and a run against the same run given the chosen ``--images`` (the same students, bit for bit)."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from dfkd import budget
from dfkd.cli import main
from dfkd.config import DistillConfig, ReconstructConfig
from dfkd.errors import DfkdError
from dfkd.models import build_model
from dfkd.profiles import Pair
from dfkd.run_config import RunConfig
from dfkd.sources import open_data
from tests.conftest import OWN

ARGS = '{"in_channels": 3, "width": 4}'


def test_plan_is_the_largest_multiple_of_the_classes_that_fits():
    """For costs drawn at random, ``plan`` equals a search over every multiple of the classes: the largest whose
    steps, epochs and test passes fit ``SHARE`` of the time left."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        r = torch.rand(6, generator=g, dtype=torch.float64).tolist()
        costs = {"image_step": 1e-4 + 1e-3 * r[0], "input_epoch": 1e-4 + 1e-2 * r[1], "test": 3 * r[2]}
        rc = ReconstructConfig(steps=1 + int(200 * r[3]))
        dc = DistillConfig(epochs=1 + int(150 * r[4]), eval_every=10)
        classes, seconds, spent = 10 if r[5] < 0.5 else 7, 900.0, 100 * r[5]
        per = rc.steps * costs["image_step"] + dc.epochs * costs["input_epoch"]
        tests = (dc.epochs + dc.eval_every - 1) // dc.eval_every  # every tenth epoch and the last
        fits = [n for n in range(0, int(seconds / per) + 2 * classes, classes)  # n * per <= seconds bounds them
                if n * per <= budget.SHARE * (seconds - spent - tests * costs["test"]) + 1e-9]
        assert budget.plan(seconds, spent, costs, rc, dc, classes) == max(fits)
    assert budget.plan(10.0, 20.0, costs, rc, dc, 10) == 0  # nothing left: nothing fits


@pytest.fixture(scope="module")
def pair(colour_dir):
    data = open_data(f"folder:{colour_dir}", normalize="auto")
    teacher, info = build_model(f"{OWN}:teacher", data.info, in_channels=3, width=4)
    return teacher, open_data(f"folder:{colour_dir}", info=info)


def test_measure_reads_the_clock_between_steps_epochs_and_the_test(pair, monkeypatch):
    """With a clock that moves one second a reading, the costs are exactly what the readings say: a second a
    reconstruction step (after the first) over the batch's inputs, a second an epoch over the timed epoch's inputs
    (the batch's repeated to the recipe's n), a second a test; and the student was trained (its weights moved)."""
    teacher, data = pair
    ticks = iter(range(10**6))
    student = build_model(f"{OWN}:student", data.info, in_channels=3, width=4)[0]
    before = [p.detach().clone() for p in student.parameters()]
    rc = ReconstructConfig(objective="bn-stats", batch_size=30, steps=120, lr=0.2, jitter=2)
    dc = DistillConfig(epochs=100, batch_size=8, average=0.5)  # measured without averaging (one epoch cannot average)
    seen, real = [], budget.distill
    monkeypatch.setattr(budget, "distill", lambda s, d, t, c, *a, **k: seen.append((d, c)) or real(s, d, t, c, *a, **k))
    costs = budget.measure(teacher, None, student, data.info, rc, dc, data.test, clock=lambda: float(next(ticks)))
    assert costs["image_step"] == 1 / 30 and costs["input_epoch"] == 1 / rc.n and costs["test"] == 1.0
    (warm, c1), (timed, c2) = seen
    assert [len(warm[0]), len(timed[0]), len(timed[1])] == [30, rc.n, rc.n] and c1 == c2
    assert c2.epochs == 1 and c2.average == 0.0 and c2.batch_size == 8
    k = torch.arange(rc.n)
    assert torch.equal(timed[0], warm[0][k % 30]) and torch.equal(timed[1], warm[1][k % 30])  # the batch, repeated
    assert timed[0].device.type == "cpu"  # on the host, as a synthetic set's inputs are read
    assert costs["seconds"] == budget.STEPS + 3  # readings 0 (start), 1..5 (the steps), 6, 7 (an epoch), 8 (a test)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    noise = budget.measure(teacher, None, student, data.info, replace(rc, objective="noise"), dc, data.test,
                           clock=lambda: float(next(ticks)))
    assert noise["image_step"] == 0.0 and noise["input_epoch"] == 1 / rc.n  # nothing optimised: no step to time
    small = budget.measure(teacher, None, student, data.info, replace(rc, n=10), dc, data.test,
                           clock=lambda: float(next(ticks)))
    assert small["input_epoch"] == 1 / 30  # a recipe smaller than the batch: the batch's epoch


def test_evaluations_count_the_test_passes_of_the_distillation():
    """Every tenth epoch and the last; under --average, the averaged epochs' passes twice (the average's and the
    weights' own): 100 epochs averaging the last 50 test after epochs 10, 20, ..., 100, and twice from 60 on."""
    assert budget.evaluations(DistillConfig(epochs=100, eval_every=10)) == 10
    assert budget.evaluations(DistillConfig(epochs=95, eval_every=10)) == 10  # ..., 90 and the last, 95
    assert budget.evaluations(DistillConfig(epochs=100, eval_every=10, average=0.5)) == 15
    assert budget.evaluations(DistillConfig(epochs=1)) == 1


def test_the_colour_probe_counts_against_the_first_objective_and_the_sizes_are_kept(pair, tmp_path, monkeypatch):
    """``fit`` subtracts the measurement's and the probe's seconds, writes what it chose, and reads it back for the
    same settings instead of measuring again; another budget measures again."""
    teacher, data = pair
    costs = {"image_step": 1e-3, "input_epoch": 1e-3, "test": 2.0, "seconds": 5.0}
    calls = []
    monkeypatch.setattr(budget, "measure", lambda *a, **k: calls.append(1) or dict(costs))
    cfg = RunConfig(student=f"{OWN}:student", teacher="t", minutes=1.0)
    p = Pair("own", "t", f"{OWN}:student", 1, 1, 0.01, dict(n=40, steps=20, batch_size=20), dict(epochs=30, eval_every=10),
             student_args={"in_channels": 3, "width": 4}, own=True)
    sized, how = budget.fit(cfg, p, "bn-stats", teacher, None, data, tmp_path, {"seconds": 7.0}, "sha")
    rc, dc = ReconstructConfig(steps=20), DistillConfig(epochs=30, eval_every=10)
    want = budget.plan(60.0, 12.0, costs, rc, dc, 10)  # quick's fewer steps (60) above the recipe's 20: its 20
    assert how["images"] == want > 0 and how["spent"] == 12.0 and how["probe"] == 7.0 and how["steps"] == 20
    assert sized.recipe_for("bn-stats")["n"] == want and sized.recipe_for("all-layers")["n"] == 40
    assert sized.recipe_for("bn-stats")["steps"] == 20 and sized.recipe_for("all-layers")["steps"] == 20
    (entry,) = json.loads((tmp_path / "budget.json").read_text())["bn-stats"].values()
    assert entry["images"] == want
    again, _ = budget.fit(cfg, p, "bn-stats", teacher, None, data, tmp_path, {"seconds": 7.0}, "sha")
    assert len(calls) == 1 and again == sized
    budget.fit(replace(cfg, minutes=2.0), p, "bn-stats", teacher, None, data, tmp_path, None, "sha")
    assert len(calls) == 2  # another budget: measured, and kept beside the first, which still resumes
    assert budget.fit(cfg, p, "bn-stats", teacher, None, data, tmp_path, None, "sha")[0] == sized and len(calls) == 2
    doc = json.loads((tmp_path / "budget.json").read_text())
    for field, bad in [("images", b) for b in ("140", 3.5, True, 5, 145)] + [("steps", b) for b in ("20", 2.5, -1, None)]:
        edited = json.loads(json.dumps(doc))  # a hand edit: inputs not a whole multiple of the classes, at least
        for entry in edited["bn-stats"].values():  # 10 a class; steps not a whole number >= 0
            entry[field] = bad
        (tmp_path / "budget.json").write_text(json.dumps(edited))
        with pytest.raises(DfkdError, match="holds no valid size for bn-stats"):
            budget.fit(cfg, p, "bn-stats", teacher, None, data, tmp_path, None, "sha")


def test_a_tight_budget_buys_inputs_at_fewer_steps_unless_steps_are_given(pair, tmp_path, monkeypatch):
    """Where the recipe's inputs do not fit at its steps, the inputs are planned, and made, at the profile's
    ``optimise_budget_steps`` (quick: 60 against 120); where they fit, at the recipe's; with --steps, at the
    user's, also in a folder whose sizes were chosen without (the key holds a --steps given)."""
    teacher, data = pair
    costs = {"image_step": 1e-3, "input_epoch": 1e-3, "test": 2.0, "seconds": 5.0}
    monkeypatch.setattr(budget, "measure", lambda *a, **k: dict(costs))
    p = Pair("own", "t", f"{OWN}:student", 1, 1, 0.01, dict(n=3000, steps=120, batch_size=20),
             dict(epochs=30, eval_every=10), student_args={"in_channels": 3, "width": 4}, own=True)
    cfg = RunConfig(student=f"{OWN}:student", teacher="t", minutes=2.0)
    dc, fewer = DistillConfig(epochs=30, eval_every=10), budget.OWN["quick"]["optimise_budget_steps"]
    at = {s: budget.plan(120.0, 5.0, costs, ReconstructConfig(steps=s), dc, 10) for s in (120, fewer)}
    assert fewer == 60 and at[120] < at[fewer] < 3000  # 2 minutes: under the recipe's 3,000 at 120 steps
    tight, how = budget.fit(cfg, p, "bn-stats", teacher, None, data, tmp_path, None, "sha")
    assert how["steps"] == fewer and how["images"] == at[fewer] and tight.recipe_for("bn-stats")["steps"] == fewer
    mine, how = budget.fit(replace(cfg, steps=120), p, "bn-stats", teacher, None, data, tmp_path, None,
                           "sha")  # the same folder: measured again for the --steps given
    assert how["steps"] == 120 and how["images"] == at[120] and mine.recipe_for("bn-stats")["steps"] == 120
    assert len(json.loads((tmp_path / "budget.json").read_text())["bn-stats"]) == 2
    roomy, how = budget.fit(replace(cfg, minutes=20.0), p, "bn-stats", teacher, None, data, tmp_path, None, "sha")
    assert how["steps"] == 120 and how["images"] >= 3000  # the recipe's inputs fit: its steps
    assert budget.fit(replace(cfg, profile="paper"), p, "bn-stats", teacher, None, data, tmp_path / "p", None,
                      "sha")[1]["steps"] == 120  # a profile without fewer steps: the recipe's
    few = replace(p, recipe=dict(p.recipe, steps=20))  # a recipe already under the profile's fewer steps: its own
    assert budget.fit(cfg, few, "bn-stats", teacher, None, data, tmp_path / "f", None, "sha")[1]["steps"] == 20
    small = replace(p, recipe=dict(p.recipe, n=200))  # more fit at 120 steps than this recipe's 200
    assert at[120] > 200
    assert budget.fit(cfg, small, "bn-stats", teacher, None, data, tmp_path / "s", None, "sha")[1]["steps"] == 120
    rounded = replace(p, recipe=dict(p.recipe, n=at[120] + 5))  # in whole multiples of the 10 classes: what fits
    assert budget.fit(cfg, rounded, "bn-stats", teacher, None, data, tmp_path / "r", None, "sha")[1]["steps"] == 120


def test_sizes_pinned_before_a_given_steps_keyed_them_still_resume(pair, tmp_path, monkeypatch):
    """An entry written without --steps in the key (before this field, or a run without --steps) is read back by a
    run given --steps where it was made at those steps, and only there: at other steps the run measures again."""
    teacher, data = pair
    calls = []
    monkeypatch.setattr(budget, "measure", lambda *a, **k: calls.append(1) or
                        {"image_step": 1e-3, "input_epoch": 1e-3, "test": 2.0, "seconds": 5.0})
    p = Pair("own", "t", f"{OWN}:student", 1, 1, 0.01, dict(n=3000, steps=120, batch_size=20),
             dict(epochs=30, eval_every=10), student_args={"in_channels": 3, "width": 4}, own=True)
    cfg = RunConfig(student=f"{OWN}:student", teacher="t", minutes=20.0)  # roomy: 120 steps, keyed without --steps
    made, how = budget.fit(cfg, p, "bn-stats", teacher, None, data, tmp_path, None, "sha")
    assert how["steps"] == 120 and len(calls) == 1
    again, _ = budget.fit(replace(cfg, steps=120), p, "bn-stats", teacher, None, data, tmp_path, None, "sha")
    assert again == made and len(calls) == 1  # the same steps: read back, not measured
    budget.fit(replace(cfg, minutes=2.0), p, "bn-stats", teacher, None, data, tmp_path, None, "sha")  # tight: 60
    budget.fit(replace(cfg, minutes=2.0, steps=120), p, "bn-stats", teacher, None, data, tmp_path, None, "sha")
    assert len(calls) == 3  # pinned at 60 without --steps: a run given --steps 120 measures again


def test_minutes_is_refused_under_torchrun_and_beyond_its_bound(monkeypatch):
    cfg = RunConfig(student=f"{OWN}:student", teacher="t", minutes=15.0)
    budget.check_minutes(cfg)
    for bad in (float("inf"), 0.0, budget.MOST * 2):
        with pytest.raises(DfkdError, match="at most"):
            budget.check_minutes(replace(cfg, minutes=bad))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DfkdError, match="under torchrun give --images"):
        budget.check_minutes(cfg)


def _run(out, *args):
    return main(["run", "--profile", "tiny", "--student", f"{OWN}:student", "--student-args", ARGS, "--quiet",
                 "--no-baselines", "--colour", "keep", "--out", str(out), *map(str, args)])


def test_a_run_sized_by_minutes_makes_what_its_images_make(colour_dir, tmp_path, monkeypatch):
    """A run with --minutes (measured for real, the plan fixed so the size is known) makes that many inputs, says so
    in its report with the --images that makes the same, resumes without measuring again, and the run given those
    --images makes the same synthetic set and the same student, bit for bit: the measurement leaves no trace."""
    measured = []
    real = budget.measure
    monkeypatch.setattr(budget, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    steps = budget.OWN["tiny"]["optimise_budget_steps"]  # under the tiny recipe's 5 and n 40
    monkeypatch.setattr(budget, "plan", lambda *a, **k: 140 if a[3].steps == steps else 30)  # 30 < 40: tight
    given = ["--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--data", f"folder:{colour_dir}",
             "--normalize", "auto"]
    assert _run(tmp_path / "a", *given, "--minutes", "0.2") == 0 and measured == [1]
    row = json.loads((tmp_path / "a" / "results.json").read_text())["rows"][0]
    assert row["configs"]["reconstruct"]["n"] == 140 and row["budget"]["images"] == 140
    assert row["budget"]["image_step"] > 0 and row["budget"]["input_epoch"] > 0
    shards = sorted((tmp_path / "a" / "own" / "synthetic").rglob("shard-*.safetensors"))
    assert sum(len(load_file(s)["label"]) for s in shards) == 140
    report = (tmp_path / "a" / "results.md").read_text()
    assert row["configs"]["reconstruct"]["steps"] == row["budget"]["steps"] == steps < 5
    assert "140 inputs, fitted to 0.2 minutes" in report
    assert f"--images 140 --steps {steps} makes this objective's students" in report
    monkeypatch.setattr(budget, "measure", lambda *a, **k: pytest.fail("measured again on a resume"))
    assert _run(tmp_path / "a", *given, "--minutes", "0.2") == 0
    assert _run(tmp_path / "b", *given, "--images", 140, "--steps", steps) == 0
    others = sorted((tmp_path / "b" / "own" / "synthetic").rglob("shard-*.safetensors"))
    assert [s.relative_to(tmp_path / "a") for s in shards] == [s.relative_to(tmp_path / "b") for s in others]
    for a, b in zip(shards, others):
        assert all(torch.equal(x, y) for x, y in zip(load_file(a).values(), load_file(b).values()))
    sa, sb = (load_file(tmp_path / k / "own" / "students" / f"{row['objective']}.safetensors") for k in "ab")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_budget_too_short_for_ten_inputs_a_class_is_refused_in_one_line(colour_dir, tmp_path, capsys, monkeypatch):
    """Costs under which 0.5 minutes fit no inputs: one line, exit 2, and no sizes or inputs written."""
    monkeypatch.setattr(budget, "measure", lambda *a, **k: {"image_step": 1.0, "input_epoch": 1.0, "test": 1.0,
                                                            "seconds": 1.0})
    code = _run(tmp_path / "run", "--teacher", f"{OWN}:teacher", "--teacher-args", ARGS, "--data",
                f"folder:{colour_dir}", "--normalize", "auto", "--minutes", "0.5")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("dfkd: --minutes: 0.5 minutes fit 0 inputs") and "give more minutes" in err[0]
    assert not (tmp_path / "run" / "own" / "budget.json").exists()
    assert not list((tmp_path / "run").rglob("shard-*"))
