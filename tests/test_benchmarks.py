"""The benchmark's FLOP counts against the layer arithmetic done by hand."""
from benchmarks.common import forward_flops
from dfkd.data import DataInfo
from dfkd.models import build_model

MNIST = DataInfo((1, 28, 28), 10)


def test_forward_flops_of_the_reference_networks():
    # LeNet-5 on 32x32: conv1 1->6 5x5 -> 28x28, conv2 6->16 5x5 -> 10x10, fc 400-120-84-10
    lenet = 2 * (25 * 6 * 28 * 28 + 6 * 25 * 16 * 10 * 10 + 400 * 120 + 120 * 84 + 84 * 10)
    assert forward_flops(build_model("lenet5", MNIST)[0], (1, 32, 32)) == lenet == 833_040
    assert forward_flops(build_model("lenet5-half", MNIST)[0], (1, 32, 32)) == 2 * (
        25 * 3 * 28 * 28 + 3 * 25 * 8 * 10 * 10 + 200 * 120 + 120 * 84 + 84 * 10)
    assert forward_flops(build_model("hinton-1200", MNIST)[0], (1, 28, 28)) == 2 * (784 * 1200 + 1200 * 1200
                                                                                    + 1200 * 10)


def test_cpu_steps_measures_each_variant_against_fp32(colour_dir, tmp_path):
    """benchmarks cpu-steps on a fresh own-model teacher recorded on colour digits: every variant's row, its
    batch, fp32's gradient against itself (cosine 1) and bf16 autocast's visibly not (the autocast acts, and
    stays close); the rows written as JSON are the rows returned."""
    import json

    from benchmarks import cpu_steps
    rows = cpu_steps.main(["--data", f"folder:{colour_dir}", "--batch", "20", "--steps", "2", "--variants",
                           "fp32,plain losses,fp32 half batch,bf16 autocast,channels-last", "--out",
                           str(tmp_path / "r.json")])
    by = {r["variant"]: r for r in rows}
    assert [r["batch"] for r in rows] == [20, 20, 10, 20, 20] and by["fp32"]["ratio"] == 1.0
    assert abs(by["fp32"]["grad_cosine"] - 1) < 1e-9 and abs(by["channels-last"]["grad_cosine"] - 1) < 1e-5
    # the fused losses descend the plain expressions' gradient and make the same inputs, to float32 rounding
    assert abs(by["plain losses"]["grad_cosine"] - 1) < 1e-5
    assert abs(by["plain losses"]["objective_fp32"] / by["fp32"]["objective_fp32"] - 1) < 1e-3
    assert 0.95 < by["bf16 autocast"]["grad_cosine"] < 1 - 1e-7
    # the inputs made under autocast differ from fp32's (it reaches optimise_batch), channels-last's do not
    assert by["bf16 autocast"]["objective_fp32"] != by["fp32"]["objective_fp32"]
    assert abs(by["channels-last"]["objective_fp32"] / by["fp32"]["objective_fp32"] - 1) < 1e-3
    assert all(r["image_steps_per_s"] > 0 and 0 <= r["agreement"] <= 1 and r["objective_fp32"] > 0 for r in rows)
    assert json.loads((tmp_path / "r.json").read_text()) == rows
