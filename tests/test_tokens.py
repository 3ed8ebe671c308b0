"""Token sequences beyond the pooled record: token-positions (each (token, feature)'s class mean and std, kept
beside the per-feature record), its objective, what it reveals (closed form, the leakage report, inspect), the
attention maps and LayerNorm outputs recorded by path, and a ViT's private file through the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dfkd import noise as dfkd_noise
from dfkd.checkpoint import save_model
from dfkd.cli import main
from dfkd.config import ReconstructConfig, RecordConfig
from dfkd.errors import DfkdError
from dfkd.inversion import invert
from dfkd.leakage import holds
from dfkd.metadata import load, save
from dfkd.models import build_model
from dfkd.objectives import make_objective
from dfkd.publishing import _suggested
from dfkd.recording import record
from dfkd.synthetic import SyntheticSet
from tests.conftest import ROOT
from tests.test_beyond_bn import GN, INFO, data, outputs64, vit

TOKEN_LAYERS = ("blocks.0.mlp.0", "blocks.1.att", "blocks.1.mlp.2")


def test_token_positions_are_every_positions_class_moments():
    """By default a ViT's file keeps, beside each token layer's per-feature record, token-positions: per class
    the mean and (unbiased) std of every (token, feature), equal to float64 moments of the outputs the test's own
    hooks see; the first layer per unit and the non-token layers get none."""
    model, (x, y) = vit(), data()
    meta = record(model, (x, y), RecordConfig(first_layer="unit"), info=INFO)
    assert meta.kinds[-1] == "token-positions"
    rows = {r["path"]: r for r in meta.header["layers"]}
    pooled = [p for p, r in rows.items() if r["type"] == "token" and r["stat"] == "feature"]
    assert len(pooled) == 6 and rows["embed"]["stat"] == "unit"
    kept = {k.split("/")[1] for k in meta.tensors if k.startswith("token-positions/")}
    assert kept == set(pooled) == {p for p, r in rows.items() if r.get("positions") is True}
    got = outputs64(model, x, pooled)
    for p in pooled:
        out = got[p].flatten(1)  # [N, T * D]
        assert meta.get("token-positions", "mean", p).shape == (3, 5 * rows[p]["dim"]) == (3, out.shape[1])
        for c in range(3):
            assert torch.allclose(meta.get("token-positions", "mean", p)[c].double(), out[y == c].mean(0), atol=1e-5)
            assert torch.allclose(meta.get("token-positions", "std", p)[c].double(), out[y == c].std(0),
                                  atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["unit tokens", "groupnorm"])
def test_token_positions_only_where_a_token_layer_is_pooled(how):
    """Per-token records (``--token-stats unit``) and a CNN get no token-positions by default, and asking for it
    there is refused in one line."""
    torch.manual_seed(0)
    model, (x, y) = (vit(), data()) if how == "unit tokens" else (GN.teacher(3, 3, width=4).eval(), data())
    cfg = dict(token_stats="unit") if how == "unit tokens" else {}
    assert "token-positions" not in record(model, (x, y), RecordConfig(**cfg), info=INFO).kinds
    with pytest.raises(DfkdError, match="token-positions needs a token layer recorded per feature"):
        record(model, (x, y), RecordConfig(kinds=("token-positions",), **cfg), info=INFO)


def test_token_positions_objective_is_class_diag_of_per_token_records():
    """The token-positions objective on a file recorded per feature equals class-diag on the same layers
    recorded per token (``--token-stats unit``): the same per-(token, feature) moments, matched the same way;
    its gradient reaches the input, and with all-layers the losses add."""
    model, (x, y) = vit(), data()
    pos = record(model, (x, y), RecordConfig(layers=TOKEN_LAYERS, kinds=("all-layers", "token-positions")), info=INFO)
    unit = record(model, (x, y), RecordConfig(layers=TOKEN_LAYERS, kinds=("class-diag",), token_stats="unit"),
                  info=INFO)
    cfg = ReconstructConfig()
    a, b = make_objective("token-positions", pos, model, cfg), make_objective("class-diag", unit, model, cfg)
    assert a.layers() == b.layers() == list(TOKEN_LAYERS)
    g = torch.Generator().manual_seed(5)
    xs, labels = torch.rand(12, 3, 8, 8, generator=g, requires_grad=True), torch.arange(12) % 3
    acts = outputs64(model.float(), xs.detach(), list(TOKEN_LAYERS))
    acts = {k: v.float() for k, v in acts.items()}
    logits = model(xs.detach())
    la, lb = a.loss(logits, acts, {}, labels), b.loss(logits, acts, {}, labels)
    assert la > 0 and torch.allclose(la, lb, rtol=1e-4)
    want = 0.0  # written out in float64: per layer and class, n_c (mean_F (w (m - mu))^2 + mean_F (w^2 (s - sigma^2))^2)
    for p in TOKEN_LAYERS:
        mu, sd = (pos.get("token-positions", k, p).double() for k in ("mean", "std"))
        w = 1 / (sd.mean(0) + 1e-3 * sd.mean(0).mean())
        out = outputs64(model, xs.detach(), [p])[p].flatten(1)
        for c in range(3):
            r = out[labels == c]
            want += len(r) * (((r.mean(0) - mu[c]) * w).pow(2).mean() +
                              ((r.var(0, unbiased=False) - sd[c].pow(2)) * w * w).pow(2).mean())
    assert abs(la.item() - float(want)) <= 1e-3 * float(want)
    both = make_objective("all-layers+token-positions", pos, model, cfg)
    alone = make_objective("all-layers", pos, model, cfg)
    tg = both.targets(labels, torch.Generator().manual_seed(1))
    part = {n.partition("|")[2]: v for n, v in tg.items() if n.startswith("0|")}
    assert torch.allclose(both.loss(logits, acts, tg, labels), alone.loss(logits, acts, part, labels) + la, rtol=1e-5)
    got = {}
    hooks = [dict(model.named_modules())[p].register_forward_hook(
        lambda _m, _i, o, p=p: got.__setitem__(p, o[0] if isinstance(o, tuple) else o)) for p in TOKEN_LAYERS]
    out = model(xs)
    for h in hooks:
        h.remove()
    a.loss(out, got, {}, labels).backward()
    assert xs.grad is not None and xs.grad.abs().sum() > 0


class PatchNet(nn.Module):
    """A ViT-like net whose first layer is a Linear over flattened 4x4 patches (a token layer affine in the input):
    4 tokens of 48 features cover the 192 input values."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(48, 48), nn.Linear(48, 3)

    def forward(self, x):
        p = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(len(x), 4, 48)
        return self.head(torch.relu(self.proj(p)).mean(1))


def test_token_positions_of_an_affine_token_layer_give_the_class_mean_inputs(capsys, tmp_path):
    """A token layer affine in the input, pooled per feature, hides where each token sits (all-layers: a rank-48
    projection of the 192 input values). By default it gets no token-positions record; named, its record gives
    each class's mean input exactly: the header says so, dfkd inspect names the record, and the inversion equals
    the true class means."""
    torch.manual_seed(0)
    model, (x, y) = PatchNet().eval(), data(90)
    default = record(model, (x, y), RecordConfig(), info=INFO)  # by default no record that would give them
    assert "token-positions" not in default.kinds and not any("positions" in r for r in default.header["layers"])
    assert all(r["class_means"] != "exact" for r in default.header["closed_form"])
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers", "token-positions")), info=INFO)  # named: kept
    form = {(r["layer"], r["stat"]): r for r in meta.header["closed_form"]}
    assert form[("proj", "feature")]["class_means"] == "projection of rank 48"
    assert form[("proj", "position")]["class_means"] == "exact"
    inv = next(i for i in invert(model, meta) if i.stat == "position")
    truth = torch.stack([x[y == c].double().mean(0) for c in range(3)])
    assert torch.allclose(inv.means.double(), truth, atol=1e-4)
    path = save(meta, tmp_path / "p.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "note: its token-positions record of proj gives each class's mean training input exactly" in out
    assert "--kinds without token-positions" in out
    assert _suggested(meta.kinds) == "all-layers"


def test_inspect_and_leakage_say_what_a_vits_file_holds(capsys, tmp_path):
    """dfkd inspect on a ViT's file lists its token layers per feature, its norm layers and each kind's line;
    dfkd leakage's report says, per layer, what is pooled and that token-positions keeps the positions."""
    code = str(ROOT / "examples" / "vit.py")
    torch.manual_seed(0)
    net, info = build_model(f"{code}:teacher", INFO, num_classes=3, image=8)
    save_model(net.eval(), tmp_path / "vit", f"{code}:teacher", {"num_classes": 3, "image": 8}, info)
    meta = record(net, data(60), RecordConfig(first_layer="unit"), info=INFO)
    path = save(meta, tmp_path / "vit.stats.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.att (4, 64) per feature cov=full" in out  # mean pooling: 4 tokens of 64 features
    assert "norm layers (norm-stats: their inputs per feature): blocks.0.norm1 (LayerNorm, 64 features)" in out
    assert "token-positions: each class's mean and std of every pooled token layer's output at each token position" in out
    assert "token-positions blocks.2.mlp.0/mean" in out and "total token-positions      18,432 floats" in out
    lines = holds(meta)
    assert "blocks.0.att (token, 4x64): its 64 features, each pooled over the sequence's 4 tokens; token-positions " \
        "keeps every (token, feature)'s mean and std" in lines
    assert "embed (conv, 64x2x2): every one of its 256 values (per unit)" in lines
    without = record(net, data(60), RecordConfig(kinds=("all-layers",)), info=INFO)
    assert any("(where each token sits is not kept)" in line for line in holds(without))


def test_attention_maps_and_layernorm_outputs_are_recorded_by_path():
    """The hand-written attention's softmax has a path: its maps ``[heads, T, T]`` record per head (pooled over
    query and key: each row sums to 1, so the per-head mean is 1/T) or per unit (the maps themselves); a
    LayerNorm's output records per feature. The class means equal float64 ones of the test's own hooks."""
    model, (x, y) = vit("hand"), data()
    paths = ["blocks.0.norm1", "blocks.0.att.softmax", "blocks.1.att.softmax"]
    got = outputs64(model, x, paths)
    for conv in ("channel", "unit"):
        meta = record(model, (x, y), RecordConfig(layers=tuple(paths), kinds=("all-layers",), cov="diag",
                                                   conv_stats=conv), info=INFO)
        rows = {r["path"]: r for r in meta.header["layers"]}
        assert rows["blocks.0.norm1"]["type"] == "token" and rows["blocks.0.norm1"]["stat"] == "feature"
        assert rows["blocks.0.att.softmax"]["shape"] == [2, 5, 5] and rows["blocks.0.att.softmax"]["stat"] == conv
        for c in range(3):
            ln = got["blocks.0.norm1"][y == c].reshape(-1, 8).mean(0)
            assert torch.allclose(meta.get("all-layers", "mean", "blocks.0.norm1")[c].double(), ln, atol=1e-5)
            att = got["blocks.1.att.softmax"][y == c]
            want = att.mean((0, 2, 3)) if conv == "channel" else att.flatten(1).mean(0)
            assert torch.allclose(meta.get("all-layers", "mean", "blocks.1.att.softmax")[c].double(), want, atol=1e-5)
        if conv == "channel":
            assert torch.allclose(meta.get("all-layers", "mean", "blocks.0.att.softmax"), torch.full((3, 2), 0.2))


def test_a_vits_private_file_from_the_command_line_serves_a_reconstruction(monkeypatch, tmp_path, capsys):
    """dfkd record --privacy on a ViT saved from the user's code: token-positions only where named (each record
    shares the budget); named, every record (token-positions too) is an event of the budget, its tensors are not
    the exact ones, epsilon meets the target, dfkd inspect says it is private, and dfkd reconstruct with
    all-layers+norm-stats+token-positions makes its inputs from it."""
    monkeypatch.setattr(dfkd_noise, "INSECURE_TEST_NOISE_SEED", 3)
    code = str(ROOT / "examples" / "vit.py")
    torch.manual_seed(0)
    x, y = data(400)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy(), x_test=x[:30].numpy(), y_test=y[:30].numpy())
    net, info = build_model(f"{code}:teacher", INFO, num_classes=3, image=8)
    save_model(net.eval(), tmp_path / "vit", f"{code}:teacher", {"num_classes": 3, "image": 8}, info)
    record_argv = ["record", "--teacher", str(tmp_path / "vit"), "--code", code, "--data", f"npz:{tmp_path / 'd.npz'}",
                   "--privacy", "4", "--range", "0,1", "--quiet"]
    assert main(record_argv + ["--out", str(tmp_path / "default.stats.safetensors")]) == 0
    assert "token-positions" not in load(tmp_path / "default.stats.safetensors").kinds  # not by default when private
    assert main(record_argv + ["--kinds", "all-layers,norm-stats,token-positions"]) == 0
    stats = tmp_path / "vit.stats.safetensors"
    meta = load(stats)
    assert "token-positions" in meta.kinds and meta.header["privacy"]["epsilon"] <= 4.0
    releases = {e["release"] for e in meta.header["privacy"]["events"]}
    pooled = [r["path"] for r in meta.header["layers"] if r["type"] == "token" and r["stat"] == "feature"]
    assert pooled and all(f"token-positions/{p}: sum" in releases for p in pooled)
    exact = record(net, (x, y), RecordConfig(kinds=("token-positions",)), info=INFO)
    for p in pooled:  # released with noise: finite, and never the exact class means (how near: test_privacy)
        got, want = meta.get("token-positions", "mean", p), exact.get("token-positions", "mean", p)
        assert not torch.allclose(got, want, atol=1e-6) and torch.isfinite(got).all()
    capsys.readouterr()
    assert main(["inspect", str(stats)]) == 0
    assert "note: its" not in capsys.readouterr().out  # private: the closed form gives noise-covered means only
    assert main(["reconstruct", "--teacher", str(tmp_path / "vit"), "--code", code, "--objective",
                 "all-layers+norm-stats+token-positions", "--images", "6", "--steps", "2", "--out",
                 str(tmp_path / "syn"), "--quiet"]) == 0
    s = SyntheticSet(tmp_path / "syn").open()
    xs, ys, _ = s.load()
    assert xs.shape == (6, 3, 8, 8) and torch.isfinite(xs).all() and json.loads(
        (tmp_path / "syn" / "manifest.json").read_text())["objective"] == "all-layers+norm-stats+token-positions"


@pytest.mark.parametrize("bad", ["no row marked", "a conv row marked", "marked without the kind", "not true"])
def test_a_header_that_misplaces_token_positions_is_refused(bad, tmp_path):
    """The header marks exactly the token layers recorded per feature that hold a token-positions record
    (``layers[].positions``); a file that marks none, marks a conv map, marks one without the kind, or marks with
    anything but true is refused in one line naming the file."""
    model, (x, y) = vit(), data()
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers", "token-positions")), info=INFO)
    path = save(meta, tmp_path / "ok.safetensors")
    assert load(path).kinds == ["all-layers", "token-positions"]
    h = json.loads(json.dumps(meta.header))
    rows = {r["path"]: r for r in h["layers"]}
    if bad == "no row marked":
        for r in h["layers"]:
            r.pop("positions", None)
    elif bad == "a conv row marked":
        rows["embed"]["positions"] = True
    elif bad == "marked without the kind":
        h["kinds"] = ["all-layers"]
    else:
        rows["blocks.0.att"]["positions"] = 1
    tensors = {k: v for k, v in meta.tensors.items() if bad != "marked without the kind" or
               not k.startswith("token-positions/")}
    with pytest.raises(DfkdError, match="bad.safetensors.*layers\\[\\]\\.positions"):
        load(save(type(meta)(h, tensors), tmp_path / "bad.safetensors"))


def test_a_vit_through_the_command_line_published_leaked_and_split_into_shares(tmp_path, capsys):
    """The commands a publisher and a user type, on a ViT saved from the user's code: dfkd record, dfkd publish
    (the folder loads back only with --code), dfkd leakage (its report lists the token layers as dfkd.leakage.holds
    does), and dfkd reconstruct from the published folder split over --rank/--world-size shares, which together
    make the very inputs one process makes."""
    code = str(ROOT / "examples" / "vit.py")
    torch.manual_seed(0)
    x, y = data(120)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy(), x_test=x[:30].numpy(), y_test=y[:30].numpy())
    npz = f"npz:{tmp_path / 'd.npz'}"
    net, info = build_model(f"{code}:teacher", INFO, num_classes=3, image=8)
    save_model(net.eval(), tmp_path / "vit", f"{code}:teacher", {"num_classes": 3, "image": 8}, info)
    assert main(["record", "--teacher", str(tmp_path / "vit"), "--code", code, "--data", npz, "--range", "0,1",
                 "--first-layer", "unit", "--quiet"]) == 0
    assert main(["publish", "--teacher", str(tmp_path / "vit"), "--code", code, "--out", str(tmp_path / "pub"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["reconstruct", "--teacher", str(tmp_path / "pub"), "--objective", "all-layers+norm-stats",
                 "--images", "4", "--steps", "1", "--out", str(tmp_path / "nocode"), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()  # the folder's code runs only when the user names it
    assert len(err) == 1 and err[0].startswith("dfkd: ") and "--code" in err[0] and "vit.py" in err[0], err
    assert not (tmp_path / "nocode").exists()
    assert main(["leakage", "--teacher", str(tmp_path / "pub"), "--code", code, "--data", npz,
                 "--out", str(tmp_path / "leak"), "--quiet"]) == 0
    report = json.loads((tmp_path / "leak.json").read_text())
    assert "blocks.0.att (token, 4x64): its 64 features, each pooled over the sequence's 4 tokens; token-positions " \
        "keeps every (token, feature)'s mean and std" in report["holds"]
    # what it measured: the per-unit patch embedding (affine in the input, full rank) gives each class's mean
    # training image in closed form (the inversion itself is checked against class means in test_leakage.py)
    (inv,) = [i for i in report["inversions"] if i["layer"] == "embed"]
    assert inv["exact"] and inv["rank"] == inv["input_dim"] == 3 * 8 * 8 and inv["r2"] > 0.999999
    assert max(inv["rmse_per_class"]) < 1e-5
    rec = ["reconstruct", "--teacher", str(tmp_path / "pub"), "--code", code, "--objective", "all-layers+norm-stats",
           "--images", "12", "--batch-size", "4", "--steps", "2", "--quiet"]
    assert main(rec + ["--out", str(tmp_path / "one")]) == 0
    for rank in ("0", "1"):
        assert main(rec + ["--out", str(tmp_path / "two"), "--rank", rank, "--world-size", "2"]) == 0
    one, two = SyntheticSet(tmp_path / "one").open().load(), SyntheticSet(tmp_path / "two").open().load()
    assert one[0].shape == (12, 3, 8, 8) and torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
