"""``dfkd run --colour``: whether a user's pair keeps its colour views. The probe's survival against closed
forms (a teacher blind to colour keeps every label; one that reads the brightest channel keeps a third, the
chance that a random channel order leaves that channel in place), the decision on a Pair, and a whole run on
data whose class is its colour (the views dropped, and kept under --colour keep)."""
import colorsys
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dfkd.cli import main
from dfkd import colour
from dfkd.colour import bar, decide, survival
from dfkd.data import DataInfo
from dfkd.errors import DfkdError, OtherSettings
from dfkd.profiles import Pair, pairs
from dfkd.recipes import OWN as OWN_RECIPES
from dfkd.resume import refusal
from dfkd.run_config import RunConfig
from tests.conftest import OWN

INFO = DataInfo(shape=(3, 8, 8), num_classes=3)


class Pattern(nn.Module):
    """Blind to colour: scores each class by a zero-sum pattern on the channels' mean, so a channel order, a
    gain per channel and an offset per channel (recolouring) change no score's rank on grey inputs."""

    def __init__(self):
        super().__init__()
        w = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
        self.w = nn.Parameter(w - w.mean(1, keepdim=True))

    def forward(self, x):
        return x.mean(1).flatten(1) @ self.w.t()


class Brightest(nn.Module):
    """Colour is the class: the brightest channel."""

    def forward(self, x):
        return x.mean((2, 3))


def test_survival_is_all_for_a_teacher_blind_to_colour():
    g = torch.Generator().manual_seed(0)
    grey = (0.25 + 0.3 * torch.rand(300, 1, 8, 8, generator=g)).expand(-1, 3, -1, -1)  # recoloured within [0, 1]
    teacher = Pattern()
    y = teacher(grey).argmax(1)
    kept, hits = survival(teacher, grey, y, INFO)
    assert hits == 300 and kept == 1.0


def test_survival_is_a_third_for_a_teacher_that_reads_the_brightest_channel():
    """The bright channel (0.8) stays the brightest under any gain and offset (at least 0.38 against at most
    0.24), so a label survives exactly when the channel order leaves its channel in place: 1/3. 300 inputs x 8
    orders: standard error 0.0096."""
    n = 300
    y = torch.arange(n) % 3
    x = torch.full((n, 3, 8, 8), 0.1)
    x[torch.arange(n), y] = 0.8
    kept, hits = survival(Brightest(), x, y, INFO)
    assert hits == n and abs(kept - 1 / 3) < 0.05
    wrong = (y + 1) % 3  # inputs the teacher does not give their intended class are left out
    assert survival(Brightest(), x, wrong, INFO) is None


def test_the_bar_is_a_sixth_of_the_way_from_chance():
    assert bar(10) == pytest.approx(0.25) and bar(2) == pytest.approx(0.5 + 0.5 / 6)


def _pair(**kw):
    o = OWN_RECIPES["quick"]
    return Pair("own", "t.py:t", "s.py:s", 3, 30, 0.01, dict(o["recipe"]), dict(o["distill"]), own=True, **kw)


def test_keep_and_drop_decide_without_a_probe_and_an_explicit_seen_views_stays(tmp_path):
    pair = _pair()
    info = DataInfo(shape=(3, 32, 32), num_classes=10)
    both = ["seen views", "distillation views"]
    kept, how = decide(RunConfig(student="s.py:s", colour="keep"), pair, None, None, info, tmp_path)
    assert kept == pair and how == {"by": "keep", "of": both, "views": "kept"}
    dropped, how = decide(RunConfig(student="s.py:s", colour="drop"), pair, None, None, info, tmp_path)
    assert how == {"by": "drop", "of": both, "views": "dropped"}
    assert dropped.recipe["views"] == "affine" and dropped.distill["augment"] == "affine+cutmix"
    assert {k: v for k, v in dropped.recipe.items() if k != "views"} == \
        {k: v for k, v in pair.recipe.items() if k != "views"}
    given, how = decide(RunConfig(student="s.py:s", colour="drop", seen_views="affine+colour"), pair, None, None, info,
                        tmp_path)
    assert given.recipe["views"] == "affine+colour" and given.distill["augment"] == "affine+cutmix"
    assert how["of"] == ["distillation views"]
    views = "affine+cutmix+colour+backdrop"  # --augment: the user's distillation views, kept as given
    ours = replace(pair, distill=dict(pair.distill, augment=views))
    given, how = decide(RunConfig(student="s.py:s", colour="drop", augment=views), ours, None, None, info, tmp_path)
    assert given.recipe["views"] == "affine" and given.distill["augment"] == views and how["of"] == ["seen views"]
    both_given = RunConfig(student="s.py:s", teacher="t.py:t", weights="w.safetensors", colour="drop", augment=views,
                           seen_views="affine+colour")
    assert decide(replace(both_given, colour="auto"), ours, None, None, info, tmp_path) == (ours, None)
    for cfg in (both_given, replace(both_given, seen_views=None, synthesis="generator")):  # nothing left to decide
        with pytest.raises(DfkdError, match="this run has none left to decide") as e:
            pairs(cfg)
        assert e.value.where == "colour"
    assert pairs(replace(both_given, augment=None, synthesis="generator"))  # the distillation's views: decided
    vectors = DataInfo(shape=(64,), num_classes=10)  # no images: no colour views to decide on
    assert decide(RunConfig(student="s.py:s", colour="drop"), pair, None, None, vectors, tmp_path) == (pair, None)
    assert list(tmp_path.iterdir()) == []  # keep and drop probe nothing


@pytest.mark.parametrize("found, views", [(dict(survival=0.25, intended=80), "kept"),
                                          (dict(survival=0.2499, intended=80), "dropped"),
                                          (dict(survival=0.0, intended=9), "kept"),  # too few to tell
                                          (dict(survival=None, intended=0), "kept")])
def test_auto_drops_below_the_bar_only_on_enough_inputs_and_decides_once(tmp_path, monkeypatch, found, views):
    calls = []

    def probe(teacher, meta, info, rc, out, restart, device):
        calls.append(rc)
        return dict(found, inputs=rc.n, bar=bar(info.num_classes), seconds=1.5)

    monkeypatch.setattr(colour, "probe", probe)
    info = DataInfo(shape=(3, 32, 32), num_classes=10)
    cfg = RunConfig(student="s.py:s", objectives=("noise", "bn-stats"))
    pair, how = decide(cfg, _pair(), None, None, info, tmp_path)
    assert how["views"] == views and how["objective"] == "bn-stats" and how["least_intended"] == 10
    assert (pair.distill["augment"] == "affine+cutmix") == (views == "dropped")
    rc = calls[0]  # 10 a class, the recipe's priors, its views without colour
    assert (rc.objective, rc.n, rc.batch_size, rc.steps, rc.views, rc.tv) == ("bn-stats", 100, 100, 60, "affine", 0.05)
    assert decide(cfg, _pair(), None, None, info, tmp_path)[1] == how and len(calls) == 1  # read back, not probed again
    assert decide(replace(cfg, restart=True), _pair(), None, None, info, tmp_path)[1] == how and len(calls) == 2
    assert decide(replace(cfg, seed=1), _pair(), None, None, info, tmp_path)[1] == how and len(calls) == 3  # its own
    assert len(list(tmp_path.glob("synthetic/colour-probe-*.json"))) == 2
    nothing, how = decide(replace(cfg, objectives=("noise",)), _pair(), None, None, info, tmp_path)
    assert how["views"] == "kept" and "survival" not in how and len(calls) == 3


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Six classes, each a hue (30, 90, ..., 330 degrees; full saturation), with noise: colour is the class. A
    channel order other than the first turns a hue by 120 degrees or mirrors it about a primary's, so into
    another class (none lies on a mirror's axis)."""
    d = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    hues = np.array([colorsys.hsv_to_rgb((k + 0.5) / 6, 1.0, 0.9) for k in range(6)])

    def split(n):
        y = np.arange(n) % 6
        x = hues[y][:, None, None, :] + rng.normal(0, 0.05, (n, 16, 16, 3))
        return (255 * x.clip(0, 1)).astype(np.uint8), y

    (x, y), (xt, yt) = split(1200), split(240)
    np.savez(d / "colours.npz", x=x, y=y, x_test=xt, y_test=yt)
    return f"npz:{d / 'colours.npz'}"


def _run(tmp, data, *args):
    assert main(["run", "--profile", "tiny", "--student", f"{OWN}:student", "--student-args", ARGS, "--data", data,
                 "--no-baselines", "--quiet", "--out", str(tmp), *map(str, args)]) == 0
    row = json.loads((tmp / "results.json").read_text())["rows"][0]
    student = json.loads((tmp / "own" / "students" / f"{row['objective']}.json").read_text())
    views = json.loads((tmp / "own" / "synthetic" / row["objective"] / "manifest.json").read_text())["config"]["views"]
    # results.json states the configs the student and its inputs were made with, the probe's verdict applied
    assert (row["configs"]["distill"], row["configs"]["reconstruct"]["views"]) == (student["distill_config"], views)
    return row, student["distill_config"]["augment"], views


ARGS = '{"in_channels": 3, "num_classes": 6, "width": 8}'


def test_a_run_on_data_whose_class_is_its_colour_drops_the_colour_views(colours, tmp_path, capsys):
    row, augment, views = _run(tmp_path / "auto", colours, "--teacher", f"{OWN}:teacher", "--teacher-args", ARGS,
                               "--teacher-epochs", 30)
    c = row["colour"]
    assert c["by"] == "auto" and c["views"] == "dropped" and c["survival"] < c["bar"] == pytest.approx(bar(6))
    assert c["inputs"] == 6 * OWN_RECIPES["tiny"]["colour_probe"]["per_class"] and c["intended"] > c["inputs"] // 2
    assert c["of"] == ["seen views", "distillation views"]
    assert augment == "affine+cutmix" and views == "affine"
    md = (tmp_path / "auto" / "results.md").read_text()
    assert "colour views (seen views and distillation views): dropped: the teacher gave" in md and "colour probe" in md
    teacher = ("--teacher", tmp_path / "auto" / "own" / "teacher", "--code", OWN)  # the same teacher, trained
    row, augment, views = _run(tmp_path / "keep", colours, *teacher, "--colour", "keep")
    assert row["colour"] == {"by": "keep", "of": ["seen views", "distillation views"], "views": "kept"}
    assert augment == "affine+cutmix+colour" and views == "affine+colour"
    # a run made before the probe dropped them, resumed: refused, with the way back named
    assert main(["run", "--profile", "tiny", "--student", f"{OWN}:student", "--student-args", ARGS, "--data", colours,
                 "--no-baselines", "--quiet", "--out", str(tmp_path / "keep"), *map(str, teacher)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished model made with other settings" in err[0] and err[0].endswith(
        "(this run dropped the colour views: --colour keep keeps them)")
    for f in (tmp_path / "keep" / "own" / "students").glob(f"{row['objective']}.*"):  # half made: its set alone
        f.unlink()
    assert main(["run", "--profile", "tiny", "--student", f"{OWN}:student", "--student-args", ARGS, "--data", colours,
                 "--no-baselines", "--quiet", "--out", str(tmp_path / "keep"), *map(str, teacher)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a synthetic set made with other settings" in err[0] and err[0].endswith(
        "(this run dropped the colour views: --colour keep keeps them)")


def test_the_colour_hint_is_given_only_where_the_views_differ():
    """A refusal gets the way back to the colour views only where a view that differs is the saved one but for its
    recolouring (however many more the message leaves out): not where the unit targets alone differ, nor where the
    user chose other views, nor for an error that is not a refusal over settings."""
    dropped = {"by": "auto", "views": "dropped", "of": ["seen views", "distillation views"]}
    hint = "(this run dropped the colour views: --colour keep keeps them)"
    base = {"reconstruct": {"views": "affine+colour", "unit_targets": "draw", "lr": 0.1, "n": 1, "steps": 1,
                            "seed": 0}, "distill": {"augment": "affine+cutmix+colour"}}
    many = {"lr": 0.2, "n": 2, "steps": 2, "seed": 1}
    for change, hinted in (({"reconstruct": {"views": "affine"}}, True),
                           ({"distill": {"augment": "affine+cutmix"}}, True),
                           ({"reconstruct": dict(many, views="affine")}, True),  # the views past the three shown
                           ({"reconstruct": many}, False),
                           ({"reconstruct": {"unit_targets": "batch"}}, False),
                           ({"reconstruct": {"views": "none"}}, False)):  # the user's own views, not the probe's
        new = {k: dict(v, **change.get(k, {})) for k, v in base.items()}
        e = refusal("f.json", "holds a finished model made with", base, new, "choose another output")
        if len(change.get("reconstruct", ())) == 5:
            assert "views" not in e.problem and "and 2 more" in e.problem
        got = colour.refused(e, dropped)
        assert got.problem == (f"{e.problem} {hint}" if hinted else e.problem)
        assert isinstance(got, OtherSettings) and got.differing == e.differing
        assert colour.refused(e, dict(dropped, views="kept")) is e
    plain = DfkdError("f.json", "holds other settings (views affine+colour -> affine)")  # words alone: no hint
    assert colour.refused(plain, dropped) is plain
    # --augment given: the probe dropped the seen views alone, so a distillation's recolouring is not its doing
    seen_only = dict(dropped, of=["seen views"])
    e = refusal("f.json", "holds a finished model made with", base,
                dict(base, distill={"augment": "affine+cutmix"}), "choose another output")
    assert colour.refused(e, seen_only) is e and colour.refused(e, dropped).problem.endswith(hint)
