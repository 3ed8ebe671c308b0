"""Teachers without BatchNorm: a vision transformer (``nn.MultiheadAttention`` or hand-written attention,
LayerNorm, a class token or mean pooling) and GroupNorm / channel-LayerNorm CNNs, from ``examples/``.
Oracles: float64 per-class moments of the layers' outputs and of the norm layers' inputs, taken by hooks of
the test's own; torch.cov; the attention module's own output; the closed-form mixture of class Gaussians
checked against the moments of the pooled samples; the norm-stats loss recomputed independently."""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace as dataclass_replace

import pytest
import torch
from torch import nn

from dfkd import noise as dfkd_noise
from dfkd.checkpoint import load_model, save_model, stats_of
from dfkd.cli_fields import config_from
from dfkd.cli_parser import build_parser
from dfkd.config import ReconstructConfig, RecordConfig, Runtime, to_dict
from dfkd.data import DataInfo
from dfkd.errors import DfkdError
from dfkd.graph import layer_infos, pair_edges
from dfkd.leakage import holds, measure
from dfkd.metadata import load, save
from dfkd.models import build_model
from dfkd.normstats import mixture, norm_layers
from dfkd.objectives import make_objective
from dfkd.own import offered
from dfkd.privacy_report import field_status
from dfkd.profiles import configs, pairs
from dfkd.publishing import _generator_lines, publish, run_flags
from dfkd.recipes import PAIRS
from dfkd.reconstruction import optimise_batch, reconstruct_file
from dfkd.recording import record
from dfkd.run_config import RunConfig
from dfkd.specs import ModelRef
from dfkd.synthetic import SyntheticSet
from dfkd.taps import default_layers, tap

from tests.conftest import ROOT


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


VIT, GN = example("vit"), example("groupnorm")
INFO = DataInfo(shape=(3, 8, 8), num_classes=3, low=0.0, high=1.0, name="blobs")


def vit(attention: str = "torch", pool: str = "cls") -> nn.Module:
    torch.manual_seed(0)
    return VIT.ViT(3, 3, image=8, patch=4, dim=8, depth=2, heads=2, mlp=16, pool=pool, attention=attention).eval()


def data(n: int = 60, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return (torch.rand(n, 3, 8, 8, generator=g) * 0.6 + 0.2 * y.view(-1, 1, 1, 1)).clamp(0, 1), y


def outputs64(model: nn.Module, x: torch.Tensor, paths: list[str], inputs: bool = False) -> dict[str, torch.Tensor]:
    """Each path's float64 output (a tuple's first) or input, by hooks of the test's own."""
    m, got = copy.deepcopy(model).double(), {}
    mods = dict(m.named_modules())

    def hook(p):
        return lambda _m, i, o: got.__setitem__(p, i[0] if inputs else (o[0] if isinstance(o, tuple) else o))
    hs = [mods[p].register_forward_hook(hook(p)) for p in paths]
    with torch.no_grad():
        m(x.double())
    for h in hs:
        h.remove()
    return got


def per_class(rows: torch.Tensor, y: torch.Tensor, k: int):
    """Per class: mean [F] and torch.cov [F, F] of rows [N, P, F] pooled over samples and positions."""
    out = []
    for c in range(k):
        r = rows[y == c].reshape(-1, rows.shape[-1])
        out.append((r.mean(0), torch.cov(r.T)))
    return out


@pytest.mark.parametrize("attention", ["torch", "hand"])
def test_vit_records_token_layers_per_feature(attention):
    """Every default layer of a ViT records (an nn.MultiheadAttention standing for its out_proj), token layers
    per feature pooled over tokens: the file's class means and covariances equal float64 torch.cov of the
    [samples x tokens, features] rows the test takes itself."""
    model, (x, y) = vit(attention), data()
    layers = default_layers(model)
    if attention == "torch":
        assert "blocks.0.att" in layers and not any(p.endswith("out_proj") for p in layers)
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers",), cov="full"), info=INFO)
    by = {row["path"]: row for row in meta.header["layers"]}
    token = [p for p, row in by.items() if row["stat"] == "feature"]
    assert "embed" in by and by["embed"]["stat"] == "channel" and by["head"]["stat"] == "unit"
    per_block = 4 if attention == "hand" else 3  # qkv, proj (or the attention module), the MLP's two Linears
    assert len(token) == 2 * per_block and all(by[p]["shape"][0] == 5 for p in token)
    got = outputs64(model, x, token)
    for p in token:
        assert by[p]["dim"] == got[p].shape[-1]
        for c, (mean, cov) in enumerate(per_class(got[p], y, 3)):
            assert torch.allclose(meta.get("all-layers", "mean", p)[c].double(), mean, atol=1e-5)
            chol = meta.get("all-layers", "chol", p)[c].double()
            assert torch.allclose(chol @ chol.T, cov, atol=1e-4, rtol=1e-4)


def test_token_stats_unit_keeps_every_token():
    """``--token-stats unit``: a token layer's statistics are per (token, feature), T*D dimensions, its class
    means those of the flattened outputs."""
    model, (x, y) = vit(), data()
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers",), cov="diag", token_stats="unit"), info=INFO)
    row = next(r for r in meta.header["layers"] if r["path"] == "blocks.1.mlp.2")
    assert row["stat"] == "unit" and row["dim"] == 5 * 8
    out = outputs64(model, x, ["blocks.1.mlp.2"])["blocks.1.mlp.2"].flatten(1)
    want = torch.stack([out[y == c].mean(0) for c in range(3)])
    assert torch.allclose(meta.get("all-layers", "mean", "blocks.1.mlp.2").double(), want, atol=1e-5)


def test_attention_tap_is_the_modules_own_output():
    """Tapping an nn.MultiheadAttention gives its attended values (the tuple's first), and an alter replaces
    them in what flows on while the tuple's rest is kept."""
    model, (x, _) = vit(), data(6)
    att = model.blocks[0].att
    h = torch.randn(6, 5, 8)
    with torch.no_grad():
        want, weights = att(h, h, h)
    wrapper = nn.ModuleDict({"a": att})
    with torch.no_grad(), tap(wrapper, ["a"], alter=lambda p, t: t * 0) as acts:
        got, w2 = wrapper["a"](h, h, h)
    assert torch.equal(acts["a"], want) and torch.equal(got, torch.zeros_like(want)) and torch.equal(w2, weights)
    assert layer_infos(model, ["blocks.0.att"], x)[0].type == "token"


def test_out_proj_of_attention_names_the_module_to_record_instead():
    model, (x, _) = vit(), data(4)
    with pytest.raises(DfkdError) as e:
        layer_infos(model, ["blocks.0.att.out_proj"], x)
    assert "never ran" in str(e.value) and "record blocks.0.att instead" in str(e.value)


def attention_maps64(att: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """An nn.MultiheadAttention's head-averaged weights computed here from its in_proj in float64:
    softmax(q k^T / sqrt(head dim)) per head, ``[N, T, T]``."""
    w, b = att.in_proj_weight.double(), att.in_proj_bias.double()
    q, k, _ = (h.double() @ w.T + b).chunk(3, -1)
    n, t, d = q.shape
    heads = att.num_heads
    q, k = (z.view(n, t, heads, d // heads).transpose(1, 2) for z in (q, k))
    return torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1).mean(1)


def test_attention_maps_are_tapped_by_path_against_their_own_computation():
    """``PATH:maps`` keeps an nn.MultiheadAttention's head-averaged weights even though the model calls it with
    need_weights=False (as examples/vit.py does), or with need_weights passed by position: they equal the
    float64 softmax(q k^T / sqrt(d)) the test computes from the module's in_proj, the model's output is the same
    as untapped, and an alter of the maps leaves the attended values alone."""
    model, (x, y) = vit(), data(6)
    with torch.no_grad():
        want_logits = model(x)
        with tap(model, ["blocks.0.norm1", "blocks.0.att:maps", "blocks.1.att:maps"]) as acts:
            logits = model(x)
    assert torch.allclose(logits, want_logits, atol=1e-6)
    assert acts["blocks.0.att:maps"].shape == (6, 5, 5)
    assert torch.allclose(acts["blocks.0.att:maps"].double(), attention_maps64(model.blocks[0].att,
                                                                               acts["blocks.0.norm1"]), atol=1e-6)
    assert not torch.allclose(acts["blocks.0.att:maps"], acts["blocks.1.att:maps"], atol=1e-3)
    att, h = model.blocks[0].att, torch.randn(3, 5, 8)

    class Positional(nn.Module):  # need_weights=False by position (query, key, value, key_padding_mask, need_weights)
        def __init__(self):
            super().__init__()
            self.att = att

        def forward(self, z):
            return self.att(z, z, z, None, False)[0]
    wrapper = Positional()
    with torch.no_grad(), tap(wrapper, ["att:maps"], alter=lambda p, t: t * 0) as acts:
        out = wrapper(h)
    assert torch.allclose(acts["att:maps"].double(), attention_maps64(att, h), atol=1e-6)
    assert torch.allclose(out, att(h, h, h, need_weights=False)[0], atol=1e-6)  # the maps' alter changes no value
    info = layer_infos(model, ["blocks.0.att:maps"], x)[0]
    assert (info.type, info.shape, info.nodes) == ("token", (5, 5), 5)
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers",), cov="diag", layers=("blocks.0.att:maps",)),
                  info=INFO)
    maps = attention_maps64(att, outputs64(model, x, ["blocks.0.norm1"])["blocks.0.norm1"])
    want = torch.stack([maps[y == c].mean((0, 1)) for c in range(3)])  # per key token, pooled over the queries
    assert torch.allclose(meta.get("all-layers", "mean", "blocks.0.att:maps").double(), want, atol=1e-6)
    assert "blocks.0.att:maps (token, 5x5): the attention weight each of its 5 key tokens gets, pooled over the 5 " \
        "query tokens (which query gave each weight is not kept)" in holds(meta)
    with pytest.raises(DfkdError, match="blocks.0.norm1:maps: :maps names an nn.MultiheadAttention"):
        layer_infos(model, ["blocks.0.norm1:maps"], x)
    with pytest.raises(DfkdError, match="no layer 'blocks.9.att:maps'"):
        layer_infos(model, ["blocks.9.att:maps"], x)


def test_attention_maps_asked_per_head_or_of_a_forward_of_its_own_and_a_module_named_so():
    """A caller asking for the weights per head (average_attn_weights=False) keeps getting them per head while
    the record gets their mean over heads; an attention whose forward takes no need_weights is refused in one
    line; a module whose own name ends in ':maps' is that module; and a maps layer joins no spectral graph edge."""
    att, h = vit().blocks[0].att, torch.randn(3, 5, 8)

    class PerHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = att

        def forward(self, z):
            out, w = self.att(z, z, z, need_weights=False, average_attn_weights=False)
            return out, w
    wrapper = PerHead()
    with torch.no_grad(), tap(wrapper, ["att:maps"]) as acts:
        _, passed = wrapper(h)
    assert passed.shape == (3, 2, 5, 5)  # the caller's per-head weights, as it asked
    assert torch.allclose(acts["att:maps"].double(), attention_maps64(att, h), atol=1e-6)

    class Own(nn.MultiheadAttention):
        def forward(self, z):
            return super().forward(z, z, z)[0]
    own = nn.Sequential(Own(8, 2, batch_first=True))
    with pytest.raises(DfkdError, match="0:maps: 0's forward takes no need_weights"):
        layer_infos(own, ["0:maps"], h)
    named = nn.ModuleDict({"x:maps": nn.Linear(8, 4)})
    with torch.no_grad(), tap(named, ["x:maps"]) as acts:
        y = named["x:maps"](h)
    assert torch.equal(acts["x:maps"], y)
    model, (x, _) = vit(), data(6)
    a, b = layer_infos(model, ["blocks.0.att:maps", "blocks.0.mlp.0"], x)
    assert a.nodes == 5 and pair_edges(model, a, b) is None  # 5 key tokens, not fc1's 8 features folded
    c, d = layer_infos(model, ["blocks.0.att", "blocks.0.mlp.0"], x)
    assert pair_edges(model, c, d).shape == (8, 16)  # the attended values do feed it


def test_attention_maps_record_and_a_reconstruction_moves_them_towards_the_file():
    """Recorded attention maps are an objective's layer like any other: 30 steps of all-layers on them alone
    bring the made inputs' maps nearer the file's class means than one step does (from the same start); the
    dropout objective masks no maps (they are read, never passed on)."""
    model, (x, y) = vit(), data()
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers",), cov="diag",
                                              layers=("blocks.0.att:maps", "blocks.1.att:maps")), info=INFO)
    obj = make_objective("all-layers", meta, model)
    assert obj.layers() == ["blocks.0.att:maps", "blocks.1.att:maps"]
    labels = torch.arange(12) % 3
    cfg = ReconstructConfig(objective="all-layers", n=12, batch_size=12, steps=30, lr=0.05, jitter=0, tv=0.0)

    def gap(z):
        with torch.no_grad(), tap(model, obj.layers()) as acts:
            model(z)
        return sum(((acts[p].mean(1) - meta.get("all-layers", "mean", p)[labels]) ** 2).sum().item()
                   for p in obj.layers())
    start, _ = optimise_batch(model, obj, labels, dataclass_replace(cfg, steps=1), torch.Generator().manual_seed(0), INFO)
    made, _ = optimise_batch(model, obj, labels, cfg, torch.Generator().manual_seed(0), INFO)
    assert gap(made) < 0.5 * gap(start), (gap(start), gap(made))
    drop = make_objective("all-layers-dropout", meta, model)
    assert list(drop.masks(INFO.shape, 4, torch.Generator().manual_seed(0))) == ["input"]


@pytest.mark.parametrize("norm", ["group", "layer", "vit"])
def test_norm_stats_records_each_norm_inputs_per_feature(norm, tmp_path):
    """norm-stats is recorded by default for a teacher with LayerNorm / GroupNorm layers (GroupNorm: per
    channel; channels-last LayerNorm: per channel; a ViT's LayerNorm: per feature, pooled over tokens), and
    its class means and stds equal float64 moments of the inputs the test's own hooks see; the file reloads."""
    torch.manual_seed(0)
    model = vit() if norm == "vit" else GN.teacher(3, 3, width=4, norm=norm).eval()
    x, y = data()
    meta = record(model, (x, y), RecordConfig(), info=INFO)
    assert meta.kinds == ["top-layer", "all-layers", "spectral-all", "spectral-pairs", "norm-stats"] + \
        (["token-positions"] if norm == "vit" else [])  # a ViT's pooled token layers keep their positions too
    assert len(meta.header["norms"]) == len(norm_layers(model))
    paths = [n["path"] for n in meta.header["norms"]]
    assert paths == [p for p, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    got = outputs64(model, x, paths, inputs=True)
    mods = dict(model.named_modules())
    for n in meta.header["norms"]:
        v = got[n["path"]]
        # a GroupNorm's features are its channels (dim 1); a LayerNorm's its last dim, whatever came before it
        rows = v.transpose(1, -1) if isinstance(mods[n["path"]], nn.GroupNorm) else v
        for c in range(3):
            r = rows[y == c].reshape(-1, rows.shape[-1])
            assert r.shape[1] == n["features"]
            assert torch.allclose(meta.get("norm-stats", "mean", n["path"])[c].double(), r.mean(0), atol=1e-5)
            assert torch.allclose(meta.get("norm-stats", "std", n["path"])[c].double(), r.std(0), atol=1e-4, rtol=1e-4)
    back = load(save(meta, tmp_path / "s.safetensors"))
    assert back.header["norms"] == meta.header["norms"]


def test_norm_stats_refused_without_norm_layers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    assert "norm-stats" not in record(model, data(), RecordConfig(), info=INFO).kinds  # the default: not added
    with pytest.raises(DfkdError, match="norm-stats needs LayerNorm or GroupNorm layers"):
        record(model, data(), RecordConfig(kinds=("norm-stats",)), info=INFO)


def test_mixture_is_the_pooled_samples_moments():
    """Classes with exactly known sample means and (biased) variances, mixed in a batch's proportions: the
    closed form equals the mean and biased variance of the concatenated samples."""
    g = torch.Generator().manual_seed(3)
    parts, counts = [], [5, 1, 4]
    for n in counts:
        parts.append(torch.randn(n, 6, generator=g, dtype=torch.float64) * torch.rand(6, generator=g) + torch.randn(6, generator=g))
    share = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    mean = torch.stack([p.mean(0) for p in parts])
    var = torch.stack([p.var(0, unbiased=False) for p in parts])
    mu, v = mixture(share, mean, var)
    allx = torch.cat(parts)
    assert torch.allclose(mu, allx.mean(0)) and torch.allclose(v, allx.var(0, unbiased=False))


def test_norm_stats_loss_against_an_independent_computation():
    """The objective's loss equals B * bn_weight * sum over norm layers of the L2 distances between the batch's
    per-feature input moments and the label-mixed stored ones, plus the cross-entropy, recomputed here; and
    its gradient reaches the input."""
    model, (x, y) = vit(), data()
    meta = record(model, (x, y), RecordConfig(kinds=("norm-stats",)), info=INFO)
    cfg = ReconstructConfig(bn_weight=0.3)
    obj = make_objective("norm-stats", meta, model, cfg)
    assert obj.layers() == [] and obj.inputs() == [p for p, _ in norm_layers(model)]
    xb = torch.rand(7, 3, 8, 8, requires_grad=True)
    lb = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    with tap(model, [], inputs=obj.inputs()) as acts:
        logits = model(xb)
        loss = obj.loss(logits, acts, {}, lb)
    share = torch.bincount(lb, minlength=3).double() / 7
    want = 0.0
    ins = outputs64(model, xb.detach(), obj.inputs(), inputs=True)
    for p in obj.inputs():
        r = ins[p].reshape(7, -1, 8)
        m_c = meta.get("norm-stats", "mean", p).double()
        v_c = meta.get("norm-stats", "std", p).double() ** 2
        mu = (share[:, None] * m_c).sum(0)
        var = (share[:, None] * (v_c + m_c ** 2)).sum(0) - mu ** 2
        want += (r.mean((0, 1)) - mu).norm() + (r.var((0, 1), unbiased=False) - var).norm()
    want = 7 * 0.3 * want + nn.functional.cross_entropy(logits.detach().double(), lb, reduction="sum")
    assert abs(float(loss.detach()) - float(want)) < 1e-4 * max(1.0, float(want))
    loss.backward()
    assert xb.grad is not None and float(xb.grad.abs().sum()) > 0


def test_norm_stats_composes_and_a_reconstruction_lowers_it():
    """``all-layers+norm-stats``'s loss is the sum of all-layers' and norm-stats' (the cross-entropy norm-stats
    adds is in it once), on the union of their taps; 30 Adam steps on noise lower the norm-stats loss of a ViT."""
    model, (x, y) = vit(), data()
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers", "norm-stats")), info=INFO)
    both = make_objective("all-layers+norm-stats", meta, model, ReconstructConfig())
    obj = make_objective("norm-stats", meta, model, ReconstructConfig())
    alone = make_objective("all-layers", meta, model, ReconstructConfig())
    g = torch.Generator().manual_seed(0)
    lb = torch.arange(12) % 3
    tg = both.targets(lb, torch.Generator().manual_seed(1))
    part = {n.partition("|")[2]: v for n, v in tg.items() if n.startswith("0|")}
    assert both.inputs() == obj.inputs() and both.layers() == alone.layers()
    with torch.no_grad(), tap(model, both.layers(), inputs=both.inputs()) as acts:
        logits = model(torch.rand(12, 3, 8, 8, generator=g))
        la, ln, lab = alone.loss(logits, acts, part, lb), obj.loss(logits, acts, {}, lb), both.loss(logits, acts, tg, lb)
    assert ln > nn.functional.cross_entropy(logits, lb, reduction="sum") > 0 and la > 0
    assert torch.allclose(lab, la + ln, rtol=1e-5)
    z = torch.rand(12, 3, 8, 8, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)

    def loss_of():
        with tap(model, [], inputs=obj.inputs()) as acts:
            logits = model(z)
            return obj.loss(logits, acts, {}, lb), nn.functional.cross_entropy(logits, lb, reduction="sum")

    def moments():  # the moment term alone: the loss less its cross-entropy
        total, ce = loss_of()
        return float((total - ce).detach())
    first = moments()
    for _ in range(30):
        opt.zero_grad()
        loss_of()[0].backward()
        opt.step()
    assert moments() < 0.8 * first


@pytest.mark.parametrize("name", ["norm-stats", "all-layers", "all-layers+norm-stats"])
def test_first_step_follows_the_input_gradient(name):
    """On a ViT teacher, Adam's first reconstruction step is ``lr * g / (|g| + eps)`` with ``g`` from autograd
    on an independent copy of the teacher, through token layers and norm-layer inputs alike."""
    model, (x, y) = vit(), data()
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers", "norm-stats")), info=INFO)
    cfg = ReconstructConfig(objective=name, steps=1, clamp=False)
    obj = make_objective(name, meta, model, cfg)
    labels = torch.arange(9) % 3
    x1, _ = optimise_batch(model, obj, labels, cfg, torch.Generator().manual_seed(0), INFO)
    g = torch.Generator().manual_seed(0)
    x0 = cfg.init_mean + cfg.init_std * torch.randn((9, *INFO.shape), generator=g)
    tg = obj.targets(labels, g)
    live = copy.deepcopy(model).requires_grad_(True)
    z = x0.clone().requires_grad_(True)
    with tap(live, obj.layers(), inputs=obj.inputs()) as acts:
        loss = obj.loss(live(z), acts, tg, labels)
    grad, = torch.autograd.grad(loss, z)
    assert torch.allclose(x1, x0 - cfg.lr * grad / (grad.abs() + 1e-8), atol=1e-4)


def test_own_recipe_for_teachers_without_batchnorm(tmp_path):
    """The recipe follows from the teacher: no BatchNorm but LayerNorm / GroupNorm layers, all-layers+norm-stats;
    a file without norm-stats, all-layers; a plain net, all-layers."""
    cfg = RunConfig(teacher="t.py:t", student="s.py:s")
    assert offered(cfg, vit(), None, True, None) == ("all-layers+norm-stats",)
    assert offered(cfg, GN.teacher(3, 3, width=4), None, True, None) == ("all-layers+norm-stats",)
    assert offered(cfg, nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), None, True, None) == ("all-layers",)
    meta = record(vit(), data(), RecordConfig(kinds=("top-layer", "all-layers")), info=INFO)
    assert offered(cfg, vit(), meta, True, None) == ("all-layers",)


def test_run_flags_choose_seen_views_and_unit_targets():
    """``dfkd run --seen-views`` / ``--unit-targets`` replace the profile's entries, those for a teacher without
    BatchNorm included; unset, the profile's stand: a generator on an own pair matches a per-unit record by the
    batch for all-layers without bn-stats only, and sees the inputs as they are; optimise matches it by the batch
    for every objective that reads one."""
    own = dict(teacher="t.py:t", student="s.py:s")
    p = pairs(RunConfig(**own, synthesis="generator"))[0]
    assert p.recipe_for("all-layers")["unit_targets"] == "batch" and p.recipe_for("all-layers")["views"] == "none"
    assert "unit_targets" not in p.recipe_for("all-layers+bn-stats")
    p = pairs(RunConfig(**own, synthesis="generator", unit_targets="draw", seen_views="affine"))[0]
    assert p.recipe_for("all-layers")["unit_targets"] == "draw" == p.recipe_for("all-layers+bn-stats")["unit_targets"]
    assert p.recipe_for("all-layers+norm-stats")["views"] == "affine"
    # optimise on an own pair matches every per-unit record by the batch, bn-stats or not; objectives that read
    # none keep their settings; --unit-targets draw gives the paper's draws back
    for profile in ("quick", "tiny"):
        p = pairs(RunConfig(**own, profile=profile))[0]
        assert p.recipe_for("all-layers+bn-stats")["unit_targets"] == "batch" == p.recipe_for("all-layers")["unit_targets"]
    assert "unit_targets" not in p.recipe_for("bn-stats") and "unit_targets" not in p.recipe_for("top-layer")
    assert pairs(RunConfig(**own, unit_targets="draw"))[0].recipe_for("all-layers+bn-stats")["unit_targets"] == "draw"
    p = pairs(RunConfig(**own, unit_targets="batch", seen_views="none"))[0]  # optimise: affine+colour by default
    assert p.recipe_for("all-layers+bn-stats") == dict(pairs(RunConfig(**own))[0].recipe, unit_targets="batch",
                                                        views="none")
    p = pairs(RunConfig(networks=("lenet5",), seen_views="shift+colour", unit_targets="batch"))[0]
    assert (p.recipe_for("all-layers")["views"], p.recipe_for("all-layers-dropout")["unit_targets"]) == \
        ("shift+colour", "batch")
    # an objective that reads no per-unit record keeps its settings (a resumed run's students still match)
    assert p.recipe_for("spectral-all") == dict(pairs(RunConfig(networks=("lenet5",)))[0].recipe, views="shift+colour")
    assert "views" not in pairs(RunConfig(networks=("lenet5",)))[0].recipe
    # the best profile matches both networks' all-layers records by the batch, and only those; --unit-targets wins;
    # its Hinton-800 alone is distilled on disagreement views, and only under optimise (a generator ignores them)
    best = pairs(RunConfig(networks=("lenet5", "hinton-1200"), profile="best"))
    assert [p.recipe_for("all-layers").get("unit_targets") for p in best] == ["batch", "batch"]
    assert [p.distill.get("adversarial") for p in best] == [None, 0.5]
    assert "adversarial" not in pairs(RunConfig(networks=("hinton-1200",), profile="best", synthesis="generator"))[0].distill
    assert pairs(RunConfig(networks=("hinton-1200",), profile="best", epochs=7))[0].distill["epochs"] == 7
    assert "unit_targets" not in best[0].recipe_for("spectral-pairs")
    assert [p.recipe_for("all-layers")["unit_targets"] for p in pairs(RunConfig(
        networks=("lenet5", "hinton-1200"), profile="best", unit_targets="draw"))] == ["draw", "draw"]
    with pytest.raises(DfkdError, match="'rotate' is not shift"):
        pairs(RunConfig(networks=("lenet5",), seen_views="rotate"))
    with pytest.raises(DfkdError, match="'pairs' is not draw or batch"):
        pairs(RunConfig(networks=("lenet5",), unit_targets="pairs"))
    with pytest.raises(DfkdError, match="paper profile runs the paper's method as written"):
        pairs(RunConfig(networks=("lenet5",), profile="paper", unit_targets="batch"))
    assert pairs(RunConfig(networks=("lenet5",), profile="paper", seen_views="none", unit_targets="draw"))


def test_run_flags_remake_a_generator_students_configs():
    """A generator student's saved configs give the ``dfkd run`` flags (a model card's recipe) that the command
    line parses back into the very same configs; settings no profile makes give none."""
    keys = ("reconstruct_config", "distill_config", "generator_config")
    own = dict(teacher="t.py:t", student="s.py:s")
    for profile, objective, extra in (("quick", "all-layers+norm-stats", own),
                                      ("tiny", "all-layers+bn-stats", dict(own, unit_targets="batch", seed=3)),
                                      ("quick", "bn-stats", dict(own, temperature=4.0)),
                                      ("quick", "all-layers+norm-stats", dict(own, lr=0.002)),
                                      ("quick", "all-layers+norm-stats", dict(own, lr=0.01)),  # the profile's own
                                      ("tiny", "all-layers", dict(teacher="saved", networks=("lenet5",), lr=0.003)),
                                      ("quick", "all-layers+bn-stats", dict(own, augment="affine+cutmix+backdrop")),
                                      ("tiny", "all-layers", dict(teacher="saved", networks=("lenet5",), augment="shift")),
                                      ("quick", "all-layers+class-diag", dict(own, teacher="saved")),
                                      ("best", "all-layers", dict(teacher="saved", networks=("hinton-1200",))),
                                      ("tiny", "spectral-pairs", dict(teacher="saved", networks=("lenet5",), seed=1))):
        cfg = RunConfig(synthesis="generator", profile=profile, **extra)
        student = cfg.student or PAIRS[cfg.networks[0]]
        saved = {k: to_dict(c) for k, c in zip(keys, configs(objective, pairs(cfg)[0], cfg.seed, cfg))}
        flags = run_flags(objective, saved, student)
        a = build_parser().parse_args(["run", "--teacher", "saved", *flags])
        back = config_from(a, RunConfig, code=())
        assert [to_dict(c) for c in configs(objective, pairs(back)[0], back.seed, back)] == [saved[k] for k in keys]
        assert ("--profile" in flags) == (profile != "quick") and ("--seed" in flags) == ("seed" in extra)
        assert ("--temperature" in flags) == ("temperature" in extra) and back.temperature == extra.get("temperature")
        assert ("--augment" in flags) == ("augment" in extra) and back.augment == extra.get("augment")
        own_lr = pairs(dataclass_replace(cfg, lr=None))[0].distill["lr"]  # a rate the profile gives needs no flag
        flagged = extra.get("lr", own_lr) != own_lr
        assert ("--lr" in flags) == flagged and back.lr == (extra["lr"] if flagged else None)
        assert (back.student, back.networks[:1] if cfg.student is None else None) == \
            (cfg.student, cfg.networks if cfg.student is None else None)
        assert ("--unit-targets" in flags) == objective.startswith("all-layers")
        changed = dict(saved, generator_config=dict(saved["generator_config"], diversity=0.7))
        assert run_flags(objective, changed, student) is None
        assert run_flags(objective, dict(saved, distill_config=None), student) is None
        # the model card's line: the teacher's kind of data, a placeholder for a kind no spec reads
        for data, spec in (("folder:/publisher/digits", "--data folder:DIR"), ("npz:/p/x.npz", "--data npz:FILE"),
                           ("mnist", "--data mnist"), ("custom", "--data SPEC"), ("", "--data SPEC")):
            line, = [x for x in _generator_lines(dict(objective=objective, generator=saved), "pub", student, "", data)
                     if x.startswith("dfkd run ")]
            assert spec in line and "/publisher" not in line and line.endswith("--out student")
        assert "No `dfkd run` profile" in "".join(_generator_lines(dict(objective=objective, generator=changed), "pub",
                                                                   student, "", "mnist"))


@pytest.mark.parametrize("attention", ["torch", "hand"])
def test_vit_private_record_accounts_every_record(monkeypatch, tmp_path, attention):
    """``--privacy`` on a ViT: every record (token layers per feature, the norm layers' inputs) is an event of
    the budget, the file's epsilon meets the target, the norm layers' description is a public header field,
    and the released file serves the norm-stats objective."""
    monkeypatch.setattr(dfkd_noise, "INSECURE_TEST_NOISE_SEED", 3)
    model, (x, y) = vit(attention), data(300)
    cfg = RecordConfig(kinds=("all-layers", "norm-stats"), privacy=4.0, value_range=(0.0, 1.0))
    m = record(model, (x, y), cfg)
    p = m.header["privacy"]
    records = [f"all-layers/{r['path']}" for r in m.header["layers"]] + \
        [f"norm-stats/{n['path']}" for n in m.header["norms"]]
    releases = {e["release"] for e in p["events"]}
    assert all(f"{r}: sum" in releases and f"{r}: second moment" in releases for r in records)
    assert p["epsilon"] <= 4.0 and field_status("norms[].features") == "public"
    back = load(save(m, tmp_path / "p.safetensors"))
    exact = record(model, (x, y), RecordConfig(kinds=("all-layers", "norm-stats")))
    for n in back.header["norms"]:  # every norm record of the saved file released with noise: never the exact one
        for stat in ("mean", "std"):
            got, want = back.get("norm-stats", stat, n["path"]), exact.get("norm-stats", stat, n["path"])
            assert got.shape == want.shape and torch.isfinite(got).all() and not torch.allclose(got, want, atol=1e-6)
    make_objective("all-layers+norm-stats", back, model, ReconstructConfig())


@pytest.mark.parametrize("first", ["unit", "pooled"])
def test_first_layer_per_unit_gives_the_class_mean_inputs(first):
    """With ``first_layer="unit"`` the first recorded layer keeps per-unit statistics while the others pool (a ViT's patch
    embedding: 8 channels x 2 x 2 positions): its class means are the per-position means of the test's own
    float64 outputs, and they give each class's mean input exactly (the embedding, 4x4 patches of 3 channels
    into 8 features, has full column rank only per position), which the pooled record does not; the leakage
    report finds the same."""
    from dfkd.inversion import revealed_means
    torch.manual_seed(0)
    model = VIT.ViT(3, 3, image=8, patch=4, dim=64, depth=1, heads=2, mlp=16).eval()
    x, y = data(90)
    meta = record(model, (x, y), RecordConfig(kinds=("all-layers",), first_layer=first), info=INFO)
    row = meta.header["layers"][0]
    assert row["path"] == "embed" and row["stat"] == ("unit" if first == "unit" else "channel")
    assert all(r["stat"] != "unit" for r in meta.header["layers"][1:-1])
    means = revealed_means(model, meta)
    if first == "pooled":
        assert means is None
        return
    out = outputs64(model, x, ["embed"])["embed"].flatten(1)
    for c in range(3):
        assert torch.allclose(meta.get("all-layers", "mean", "embed")[c].double(), out[y == c].mean(0), atol=1e-5)
        assert torch.allclose(means[c].double(), x[y == c].double().mean(0), atol=1e-4)
    report, _ = measure(model, meta, (x, y))  # the leakage report (dfkd leakage) says as much
    assert [(r["layer"], r["stat"], r["exact"]) for r in report["inversions"]] == [("embed", "unit", True)]
    assert report["inversions"][0]["r2"] > 0.9999


def test_layernorm_over_several_dimensions_and_unused_norms():
    """A LayerNorm over ``[H, W]`` of a ``[N, C, H, W]`` map keeps H*W features, pooled over channels (an
    oracle from the test's own reshape); a norm layer that never runs (an auxiliary head's) is left out of
    norm-stats instead of failing the record."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm([8, 8])
            self.aux = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3))  # never called
            self.head = nn.Linear(4 * 64, 3)

        def forward(self, x):
            return self.head(self.norm(self.conv(x)).flatten(1))
    torch.manual_seed(0)
    model, (x, y) = Net().eval(), data()
    meta = record(model, (x, y), RecordConfig(kinds=("norm-stats",)), info=INFO)
    assert meta.header["norms"] == [{"path": "norm", "type": "LayerNorm", "features": 64}]
    v = outputs64(model, x, ["norm"], inputs=True)["norm"]          # [N, 4, 8, 8]
    for c in range(3):
        r = v[y == c].reshape(-1, 4, 64).reshape(-1, 64)             # every (sample, channel) a draw of H*W values
        assert torch.allclose(meta.get("norm-stats", "mean", "norm")[c].double(), r.mean(0), atol=1e-5)


def test_sequence_first_attention_and_channels_first_sequences():
    """An nn.MultiheadAttention without batch_first gives [T, N, D]: recording it is refused in one line
    naming the fix; a Conv1d's and a GroupNorm's [N, C, L] outputs are maps, pooled per channel."""
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2)                   # batch_first=False
            self.conv, self.gn = nn.Conv1d(8, 6, 1), nn.GroupNorm(2, 6)

        def forward(self, x):                                         # x: [N, 5, 8]
            h = self.att(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))[0].transpose(0, 1)
            return self.gn(self.conv(h.transpose(1, 2))).mean(2)
    model, x = Seq().eval(), torch.randn(4, 5, 8)
    with pytest.raises(DfkdError, match="att: the output is not a float tensor with one row per input .an "
                       "nn.MultiheadAttention needs batch_first=True"):
        layer_infos(model, ["att"], x)
    infos = layer_infos(model, ["conv", "gn"], x)
    assert [(i.type, i.stat, i.dim) for i in infos] == [("conv", "channel", 6), ("conv", "channel", 6)]


def test_a_run_refuses_its_statistics_without_the_kinds_its_teacher_offers(tmp_path):
    """For a user's pair, a statistics file without the norm-stats its teacher offers (recorded before the kind
    existed) is stale, and so is one with its first layer pooled; a registry-style run (not a pair) takes
    either, and a first layer per unit never counts as another --conv-stats."""
    from dfkd.pipeline import _stale
    from dfkd.files import weights_sha256
    torch.manual_seed(0)
    model, ex = GN.teacher(3, 3, width=4).eval(), torch.zeros(7, 3, 8, 8)
    sha = weights_sha256(model.state_dict())
    path = save(record(model, data(), RecordConfig(kinds=("top-layer", "all-layers")), info=INFO), tmp_path / "s")
    assert _stale(path, sha, "channel", model, ex, True) == "kinds without norm-stats"
    assert _stale(path, sha, "channel", model, ex, False) is None
    path = save(record(model, data(), RecordConfig(), info=INFO), tmp_path / "s")
    assert _stale(path, sha, "channel", model, ex, True) == "first_layer pooled -> unit"
    path = save(record(model, data(), RecordConfig(first_layer="unit"), info=INFO), tmp_path / "s")
    assert _stale(path, sha, "channel", model, ex, True) is None and _stale(path, sha, "channel", model, ex, False) is None
    assert _stale(path, sha, "unit", model, ex, False) == "conv_stats channel -> unit"


def test_a_norm_layer_that_never_runs_offers_no_norm_stats():
    """The recipe asks for norm-stats only where a forward pass runs a norm layer batch first: a plain net with an
    unused LayerNorm gets all-layers (which its record then holds), and asking for norm-stats is refused."""
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = nn.Sequential(nn.Flatten(), nn.Linear(192, 6), nn.ReLU(), nn.Linear(6, 3)), \
                nn.LayerNorm(6)

        def forward(self, x):
            return self.body(x)
    model, ex = Aux().eval(), torch.zeros(7, 3, 8, 8)
    assert offered(RunConfig(teacher="t.py:t", student="s.py:s"), model, None, True, None, ex) == ("all-layers",)
    assert "norm-stats" not in record(model, data(), RecordConfig(), info=INFO).kinds
    with pytest.raises(DfkdError, match="norm-stats needs LayerNorm or GroupNorm layers"):
        offered(RunConfig(teacher="t.py:t", student="s.py:s", objectives=("all-layers+norm-stats",)), model, None,
                True, None, ex)


@pytest.mark.parametrize("attention", ["torch", "hand"])
def test_vit_is_published_and_reconstructed_by_two_shares_as_by_one(tmp_path, attention):
    """A ViT teacher saved from the user's code (nn.MultiheadAttention or hand-written attention), its statistics
    recorded (token layers per feature, norm-stats), goes through dfkd publish (the folder loads back only with
    its code named); dfkd reconstruct from the folder, split over two shares (--rank / --world-size, as a job
    array or torchrun runs it), makes the very inputs one process makes."""
    code = str(ROOT / "examples" / "vit.py")
    torch.manual_seed(0)
    args = {"num_classes": 3, "image": 8, "attention": attention}
    net, info = build_model(f"{code}:teacher", INFO, **args)
    save_model(net.eval(), tmp_path / "vit", f"{code}:teacher", args, info)
    save(record(net, data(120), RecordConfig(kinds=("all-layers", "norm-stats"))), tmp_path / "vit.stats.safetensors")
    folder = publish(ModelRef(str(tmp_path / "vit"), code=(code,)), tmp_path / "vit.stats.safetensors", tmp_path / "pub")
    with pytest.raises(DfkdError, match="--code"):
        load_model(folder)
    ref, stats = ModelRef(str(folder), code=(code,)), str(stats_of(folder))
    assert load(stats).kinds == ["all-layers", "norm-stats"]
    rc = ReconstructConfig(objective="all-layers+norm-stats", n=16, batch_size=4, steps=3)
    reconstruct_file(ref, stats, tmp_path / "one", rc)
    for rank in (0, 1):
        reconstruct_file(ref, stats, tmp_path / "two", rc, rt=Runtime(rank=rank, world_size=2))
        # each share makes its own shards (batch b is rank b % 2's): after rank 0 alone, half the set, unfinished
        assert sorted(f.name for f in (tmp_path / "two").glob("shard-*")) == \
            [f"shard-{b:05d}.safetensors" for b in ((0, 2) if rank == 0 else (0, 1, 2, 3))]
        if rank == 0:
            with pytest.raises(DfkdError, match="incomplete"):
                SyntheticSet(tmp_path / "two").open()
    reconstruct_file(ref, stats, tmp_path / "second", rc, rt=Runtime(rank=1, world_size=2))  # rank 1 alone: its own
    assert sorted(f.name for f in (tmp_path / "second").glob("shard-*")) == ["shard-00001.safetensors",
                                                                             "shard-00003.safetensors"]
    one, two = SyntheticSet(tmp_path / "one").open(), SyntheticSet(tmp_path / "two").open()
    assert len(one) == len(two) == 16
    for a, b in zip(one.load(), two.load()):
        assert torch.equal(a, b)
