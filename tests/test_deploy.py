"""Export and data-free int8 quantization (``dfkd export``). Oracles: the PyTorch model's own logits on
real test images (MNIST digits from IDX files, colour digits from an image folder), the synthetic set's
shards read whole, the float32 network's own predictions on inputs held apart from the calibration."""
from __future__ import annotations

import hashlib
import json
import shlex

import numpy as np
import pytest
import torch
from torch import nn

from dfkd import deployment
from dfkd.checkpoint import save_model
from dfkd.cli import main
from dfkd.config import ExportConfig, ReconstructConfig
from dfkd.data import DataInfo, as_batches
from dfkd.deployment import drop_beyond, export_file, export_model
from dfkd.errors import DfkdError
from dfkd.exporting import read_metadata, to_onnx
from dfkd.inference import example_inputs, run_onnx, session
from dfkd.models import build_model
from dfkd.quantization import SetInputs, TensorInputs, set_inputs
from dfkd.reconstruction import reconstruct_file
from dfkd.shipping import kept_figures
from dfkd.sources import open_data
from dfkd.specs import DataRef, ModelRef, open_with_data
from dfkd.synthetic import SyntheticSet

from tests.conftest import OWN, ROOT


@pytest.fixture(scope="module")
def cal(world, tmp_path_factory):
    """384 inputs reconstructed from the world's LeNet-5 (all-layers, 10 steps), in 6 shards of 64."""
    d = tmp_path_factory.mktemp("deploy") / "syn"
    reconstruct_file(ModelRef(str(world.teacher)), str(world.stats), d,
                     ReconstructConfig(objective="all-layers", n=384, batch_size=64, steps=10))
    return d


def _whole(path) -> tuple[torch.Tensor, torch.Tensor]:
    """The set's inputs and teacher labels, every shard read whole."""
    x, _, logits = SyntheticSet(path).open().load()
    return x, logits.argmax(1)


def test_registry_model_round_trips_on_real_test_images(world, tmp_path, capsys):
    out = tmp_path / "teacher.onnx"
    assert main(["export", str(world.teacher), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    net, _, source = open_with_data(ModelRef(str(world.teacher)), DataRef())
    x, _ = next(as_batches(source.test, len(source.test)))  # 500 real MNIST test digits, raw 0..1, padded to 32x32
    with torch.no_grad():
        want = net(source.info.to_model(x))
    got = run_onnx(session(out), x)
    assert got.shape == want.shape == (500, 10)
    assert (got - want).abs().max().item() <= 1e-4
    for n in (1, 7):  # any batch size
        assert (run_onnx(session(out), x[:n]) - want[:n]).abs().max().item() <= 1e-4
    meta = read_metadata(out)
    inp = json.loads(meta["input"])
    assert inp["shape"] == ["batch", 1, 32, 32] and inp["raw_range"] == [0.0, 1.0]
    assert json.loads(meta["class_names"]) == [str(c) for c in range(10)]
    assert json.loads(meta["source"])["weights_sha256"] == json.loads((world.teacher.with_suffix(".json")).read_text())["sha256"]


def test_user_bn_residual_model_takes_raw_colour_pixels(colour_dir, tmp_path, capsys):
    """A user's BatchNorm / residual / GELU net on colour images, its normalisation folded into the file:
    ONNX Runtime on raw pixels against PyTorch on normalised ones."""
    data = open_data(f"folder:{colour_dir}")
    info = DataInfo((3, 32, 32), 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), class_names=data.info.class_names)
    torch.manual_seed(0)
    net, _ = build_model(f"{OWN}:teacher", info, in_channels=3, width=4)
    net.train()
    with torch.no_grad():  # running statistics that are not the initial 0 / 1
        for _ in range(3):
            net(info.to_model(torch.rand(32, 3, 32, 32)))
    save_model(net.eval(), tmp_path / "own", f"{OWN}:teacher", {"in_channels": 3, "width": 4}, info)
    out = tmp_path / "own.onnx"
    assert main(["export", str(tmp_path / "own"), "--out", str(out)]) == 2
    assert "--code" in capsys.readouterr().err  # user code runs only where the user names it
    assert main(["export", str(tmp_path / "own"), "--out", str(out), "--code", str(OWN)]) == 0
    x, _ = next(as_batches(data.test, len(data.test)))  # 300 real colour digits, raw 0..1
    with torch.no_grad():
        want = net(info.to_model(x))
    assert (run_onnx(session(out), x) - want).abs().max().item() <= 1e-4
    assert (run_onnx(session(out), info.to_model(x)) - want).abs().max().item() > 1e-2  # it does normalise
    meta = read_metadata(out)
    assert json.loads(meta["class_names"]) == list(data.info.class_names)
    norm = json.loads(meta["input"])["normalisation"]
    assert norm == {"folded_in": True, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    raw = out.read_bytes()
    assert str(ROOT).encode() not in raw and b"site-packages" not in raw  # no stack traces naming this machine


@pytest.mark.parametrize("attention,pool", [("torch", "mean"), ("hand", "cls")])
def test_user_vit_without_batchnorm_round_trips_on_colour_images(colour_dir, attention, pool):
    """A user's ViT (nn.MultiheadAttention or hand-written attention, LayerNorm, GELU, a class token or mean
    pooling): ONNX Runtime on raw colour digits against PyTorch."""
    data = open_data(f"folder:{colour_dir}", normalize="auto")
    torch.manual_seed(0)
    net, info = build_model(f"{ROOT}/examples/vit.py:teacher", data.info, attention=attention, pool=pool)
    raw, diff = to_onnx(net.eval(), info)
    x, _ = next(as_batches(data.test, 200))
    with torch.no_grad():
        want = net(info.to_model(x))
    assert (run_onnx(session(raw), x) - want).abs().max().item() <= 1e-4
    assert diff <= 1e-4


def test_calibration_reader_yields_exactly_the_shards_inputs(cal, monkeypatch):
    x, y = _whole(cal)
    s = SyntheticSet(cal).open()
    read = []
    real = SyntheticSet.shard
    monkeypatch.setattr(SyntheticSet, "shard", lambda self, k: read.append(k) or real(self, k))
    for start, n, shards in ((0, 384, [0, 1, 2, 3, 4, 5]), (10, 100, [0, 1]), (60, 10, [0, 1]), (64, 64, [1]),
                             (300, 200, [4, 5]), (384, 5, [])):
        read.clear()
        got = list(set_inputs(s, start, n, batch_size=48))
        assert read == shards, (start, n, read)
        assert all(len(b) <= 48 for b, _ in got)
        gx = torch.cat([b for b, _ in got]) if got else torch.empty(0, *x.shape[1:])
        gy = torch.cat([l for _, l in got]) if got else torch.empty(0, dtype=torch.long)
        assert torch.equal(gx, x[start:start + n]) and torch.equal(gy, y[start:start + n])


def test_int8_keeps_agreement_on_held_apart_inputs_and_says_where_it_came_from(world, cal, tmp_path):
    out, npz = tmp_path / "t8.onnx", tmp_path / "cal.npz"
    cfg = ExportConfig(quantize="int8", calibration_inputs=128, check_inputs=256)
    path, r = export_file(ModelRef(str(world.teacher)), out, cfg, str(cal), str(npz))
    x, y = _whole(cal)
    net, _, source = open_with_data(ModelRef(str(world.teacher)), DataRef())
    held = x[128:]  # the 256 inputs after the calibration ones
    with torch.no_grad():
        fp32 = net(source.info.to_model(held)).argmax(1)
    int8 = run_onnx(session(out), held).argmax(1)
    agree = (int8 == fp32).float().mean().item()
    assert agree >= 0.95, agree
    c = r["check"]
    assert c["n"] == 256 and c["inputs"] == "held apart"
    assert c["int8_vs_fp32"] == pytest.approx(agree, abs=1 / 256 + 1e-9)  # ONNX float32 may differ from PyTorch's at a tie
    assert c["int8"] == pytest.approx((int8 == y[128:]).float().mean().item())
    assert r["calibration_inputs"] == 128 and r["bytes"] == out.stat().st_size == r["int8_bytes"] < r["fp32_bytes"] / 2
    q = json.loads(read_metadata(out)["quantization"])
    assert q["calibration"]["inputs"] == 128 and q["method"] == "minmax"
    assert q["calibration"]["fingerprint"] == SyntheticSet(cal).open().fingerprint()
    assert json.loads(read_metadata(out)["class_names"]) == [str(c) for c in range(10)]  # the float32 file's kept
    raw = out.read_bytes()
    assert str(tmp_path).encode() not in raw and str(cal.parent).encode() not in raw and q["calibration"]["set"] == "syn"
    with np.load(npz) as z:  # the calibration set itself, as the exported file takes it
        assert np.array_equal(z["x"], x[:128].numpy()) and np.array_equal(z["teacher_label"], y[:128].numpy())
    tx, ty = next(as_batches(source.test, len(source.test)))  # and on 500 real test digits
    acc8 = (run_onnx(session(out), tx).argmax(1) == ty).float().mean().item()
    with torch.no_grad():
        acc32 = (net(source.info.to_model(tx)).argmax(1) == ty).float().mean().item()
    assert acc8 >= acc32 - 0.02, (acc8, acc32)


def test_int8_file_is_at_least_3_5_times_smaller_for_a_registry_student():
    """The shipped files, metadata included (export_model's): Hinton-800's int8 file against its float32 one."""
    info = DataInfo((1, 28, 28), 10)
    torch.manual_seed(0)
    net, info = build_model("hinton-800", info)
    x, source = example_inputs(info, 256), {"spec": "hinton-800", "weights_sha256": "0" * 64}
    fp32, _ = export_model(net.eval(), info, ExportConfig(), None, source)
    cal = TensorInputs(x, torch.zeros(256, dtype=torch.long), {"noise": "uniform"})
    int8, r = export_model(net, info, ExportConfig(quantize="int8", calibration_inputs=256, check_inputs=1), cal, source)
    assert r["calibration_inputs"] == 256 and json.loads(read_metadata(int8)["source"]) == source
    assert len(fp32) / len(int8) >= 3.5, (len(fp32), len(int8))
    n = sum(p.numel() for p in net.parameters())
    assert len(fp32) >= 4 * n and len(int8) < 4 * n / 3.5


def test_a_batch_size_fixed_by_the_code_is_refused():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bias = nn.Linear(6, 3), nn.Parameter(torch.zeros(1, 3))

        def forward(self, x):
            return self.fc(x) + self.bias.expand(len(x), -1)  # len(x): a Python int while traced

    with pytest.raises(DfkdError, match="free batch size.*len\\(x\\)"):
        to_onnx(Fixed().eval(), DataInfo((6,), 3))


def test_a_module_onnx_cannot_express_is_named():
    class CumMax(nn.Module):
        def forward(self, x):
            return torch.cummax(x, 1)[0]

    info = DataInfo((6,), 3)
    net = nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.ReLU(), CumMax()), nn.Linear(8, 3))
    with pytest.raises(DfkdError) as e:
        to_onnx(net.eval(), info)
    assert e.value.where == "model"
    assert "module 1.1 (CumMax)" in e.value.problem and "aten.cummax" in e.value.problem


def test_a_drop_beyond_max_drop_is_warned_with_its_figures(world, cal, tmp_path, capsys, monkeypatch):
    out = tmp_path / "w.onnx"
    argv = ["export", str(world.teacher), "--out", str(out), "--quantize", "int8", "--calibration", str(cal),
            "--calibration-inputs", "64", "--check-inputs", "64"]
    calls, real = [], deployment.drop_beyond
    monkeypatch.setattr(deployment, "drop_beyond", lambda c, m: calls.append((c, m)) or real(c, m))
    assert main(argv + ["--max-drop", "-101"]) == 0  # any figure is a drop beyond -101 points
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dfkd: warning: {out}: int8 agrees with the teacher's labels on ")
    c = json.loads(read_metadata(out)["quantization"])["check"]
    assert f"{100 * c['int8']:.2f}% of 64 synthetic inputs" in err[0] and f"float32 on {100 * c['fp32']:.2f}%" in err[0]
    assert main(argv + ["--max-drop", "100"]) == 0 and capsys.readouterr().err == ""  # no drop beyond 100 points
    assert [m for _, m in calls] == [-101.0, 100.0]  # each run's own check, as its file records it
    assert all((got["fp32"], got["int8"]) == (c["fp32"], c["int8"]) for got, _ in calls), calls


def test_the_drop_is_float32_minus_int8_in_points_and_warned_only_beyond_max_drop():
    """The drop rule dfkd export and dfkd run --export warn by (warn_drop; their wiring: the tests above), at its
    edge: 87.5% against 100% is a drop of 12.5 points, beyond 12.4 and -12.6 but not beyond 12.5 itself; a gain is no drop; no check, no warning."""
    check = {"fp32": 1.0, "int8": 0.875}
    assert drop_beyond(check, 12.4) == pytest.approx(12.5) and drop_beyond(check, -12.6) == pytest.approx(12.5)
    assert drop_beyond(check, 12.5) is None and drop_beyond(check, 12.6) is None
    assert drop_beyond({"fp32": 0.875, "int8": 1.0}, -12.4) is None  # int8 12.5 points higher: -12.5 is not beyond
    assert drop_beyond({"fp32": 0.875, "int8": 1.0}, -12.6) == pytest.approx(-12.5)
    assert drop_beyond(None, -101) is None and drop_beyond({}, -101) is None


def test_without_the_deploy_extra_one_line_says_how_to_install(world, tmp_path, monkeypatch, capsys):
    import importlib
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name.startswith("onnx") else real(name, *a))
    assert main(["export", str(world.teacher), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'dfkd[deploy]'" in err
    assert not (tmp_path / "x.onnx").exists()


def test_export_model_refuses_int8_without_calibration():
    info = DataInfo((4,), 2)
    with pytest.raises(DfkdError, match="calibration inputs"):
        export_model(nn.Linear(4, 2), info, ExportConfig(quantize="int8"))


def test_run_export_with_a_generator_calibrates_on_its_samples_and_the_card_says_so(colour_dir, tmp_path, monkeypatch,
                                                                                    capsys):
    """dfkd run --synthesis generator --export int8 on a user's BN pair and colour images: the int8 file is
    calibrated on the saved generator's samples, matches the report's figures, and the model card states it; its
    warning follows the drop rule (drop_beyond) on the file's own check at --max-drop's default."""
    calls = []
    monkeypatch.setattr(deployment, "drop_beyond", lambda c, m: calls.append((c, m)) or 5.0)
    out = tmp_path / "r"
    pair = ["--teacher", f"{OWN}:teacher", "--teacher-args", '{"in_channels": 3, "width": 4}', "--student",
            f"{OWN}:student", "--student-args", '{"in_channels": 3, "width": 4}', "--data", f"folder:{colour_dir}",
            "--normalize", "auto"]
    argv = ["run", *pair, "--profile", "tiny", "--synthesis", "generator", "--no-baselines", "--export", "int8",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert calls == [(row["deploy"]["check"], 1.0)], calls
    assert f"{row['deploy']['file']}: int8 agrees with the teacher's labels on" in capsys.readouterr().err
    students = out / "own" / "students"
    stem = students / row["objective"]
    f = students / row["deploy"]["file"]
    assert f.name == f"{row['objective']}.int8.onnx" and row["deploy"]["bytes"] == f.stat().st_size
    q = json.loads(read_metadata(f)["quantization"])
    assert q["calibration"]["generator"] == f"{row['objective']}.generator.safetensors" and q["calibration"]["inputs"] == 1024
    assert q["check"]["n"] == 1024 and q["check"]["inputs"] == "held apart"
    data = open_data(f"folder:{colour_dir}")
    x, y = next(as_batches(data.test, len(data.test)))
    acc = (run_onnx(session(f), x).argmax(1) == y).float().mean().item()
    assert row["deploy"]["accuracy"] == pytest.approx(acc)
    assert json.loads((stem.parent / (stem.name + ".deploy.json")).read_text()) == row["deploy"]
    made, report = f.stat().st_mtime_ns, (out / "results.md").read_bytes()
    assert main(argv) == 0  # run again: the student and its file are finished work, kept with their figures
    assert f.stat().st_mtime_ns == made and (out / "results.md").read_bytes() == report
    figures, source = stem.parent / (stem.name + ".deploy.json"), {"weights_sha256": row["deploy"]["student_sha256"]}
    assert kept_figures(figures, f, source, "int8") == row["deploy"]
    assert kept_figures(figures, f, {"weights_sha256": "0" * 64}, "int8") is None  # other weights: made again
    assert kept_figures(figures, f, source, "none") is None  # the other mode: made again
    f.write_bytes(f.read_bytes() + b"\0")  # a file that is not the one measured: made again
    assert kept_figures(figures, f, source, "int8") is None
    assert main(["publish", "--teacher", str(out / "own" / "teacher"), "--code", str(OWN), "--student", str(stem),
                 "--out", str(tmp_path / "pub")]) == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    config = json.loads((tmp_path / "pub" / "config.json").read_text())  # the user's code by spec and sha256, never copied
    assert config["model"]["code_sha256"] == hashlib.sha256(OWN.read_bytes()).hexdigest()
    assert not list((tmp_path / "pub").glob("*.py")) and "--code own_model.py" in card
    assert f"Exported by `dfkd run --export int8` beside the student as `{f.name}`" in card and f"**{100 * acc:.2f}%**" in card
    # the card's recipe is the generator's dfkd run line, not a reconstruct/distill pair; run as a user would, from
    # the published folder and the named code, it makes the very same student
    line, = [ln for ln in card.splitlines() if ln.startswith("dfkd ")]
    assert line.startswith("dfkd run --teacher path/to/pub --code own_model.py --student own_model.py:student ")
    assert "--profile tiny" in line and "--synthesis generator" in line and "--unit-targets draw" in line
    mine = {"path/to/pub": str(tmp_path / "pub"), "own_model.py": str(OWN), "own_model.py:student": f"{OWN}:student",
            "folder:DIR": f"folder:{colour_dir}", "student": str(tmp_path / "again")}
    assert main([mine.get(a, a) for a in shlex.split(line)[1:]] + ["--quiet"]) == 0
    again = tmp_path / "again" / "own" / "students" / f"{row['objective']}.safetensors"
    assert again.read_bytes() == stem.with_suffix(".safetensors").read_bytes()


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibrators_are_quiet_and_keep_agreement(world, cal, method, capfd):
    """ONNX Runtime's entropy and percentile calibrators print and log; dfkd's export says nothing of it."""
    net, _, source = open_with_data(ModelRef(str(world.teacher)), DataRef())
    cfg = ExportConfig(quantize="int8", calibration_inputs=128, check_inputs=256, calibration_method=method)
    raw, r = export_model(net, source.info, cfg, SetInputs(SyntheticSet(cal).open()))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert json.loads(read_metadata(raw)["quantization"])["method"] == method
    x, _ = _whole(cal)
    with torch.no_grad():
        fp32 = net(source.info.to_model(x[128:])).argmax(1)
    assert (run_onnx(session(raw), x[128:]).argmax(1) == fp32).float().mean().item() >= 0.9


def test_run_export_refuses_a_student_onnx_cannot_express_before_training(colour_dir, tmp_path, capsys):
    (tmp_path / "cum.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass S(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(3 * 32 * 32, 10)\n\n    def forward(self, x):\n"
        "        return torch.cummax(self.fc(x.flatten(1)), 1)[0]\n\n\ndef make():\n    return S()\n")
    out = tmp_path / "r"
    code = main(["run", "--teacher", f"{OWN}:teacher", "--teacher-args", '{"in_channels": 3, "width": 4}', "--student",
                 f"{tmp_path / 'cum.py'}:make", "--data", f"folder:{colour_dir}", "--profile", "tiny", "--export", "int8",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dfkd: --student: ") and "aten.cummax" in err[0]
    assert not out.exists()  # refused before anything was trained or written
