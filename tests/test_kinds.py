"""The kind registry and the kind added through it, ``class-diag``: per chosen layer, each class's mean and
per-coordinate std of the layer's output, recorded by the same loop as every kind (exact and private), and
its objective. Oracles: float64 torch.mean / torch.std per class; the all-layers record with a diagonal
covariance; the privacy accountant's own calibration; finite differences and an independent loss."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dfkd import cli_commands, noise, privacy
from dfkd.config import ReconstructConfig, RecordConfig
from dfkd.data import DataInfo
from dfkd.errors import DfkdError
from dfkd.kinds import KINDS, REGISTRY
from dfkd.metadata import contract, load, save
from dfkd.pipeline import run
from dfkd.objectives import OBJECTIVES, make_objective
from dfkd.privacy import Budget
from dfkd.privacy_report import HEADER_FIELDS
from dfkd.profiles import objectives
from dfkd.publishing import model_card
from dfkd.recording import record
from dfkd.run_config import RunConfig
from dfkd.taps import tap

INFO = DataInfo(shape=(2, 6, 6), num_classes=3, low=0.0, high=1.0, name="squares")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5), nn.ReLU(),
                         nn.Linear(5, 3)).eval()


def data(n: int = 90, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return (torch.rand(n, 2, 6, 6, generator=g) * 0.6 + 0.2 * y.view(-1, 1, 1, 1)).clamp(0, 1), y


def rows64(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each chosen layer's float64 output as rows: a conv map per channel pools its positions ([N*P, C])."""
    m, out = copy.deepcopy(model).double(), {}
    hooks = [m[k].register_forward_hook(lambda mod, i, o, k=k: out.__setitem__(k, o)) for k in (0, 3, 5)]
    with torch.no_grad():
        m(x.double())
    for h in hooks:
        h.remove()
    return {"0": out[0].transpose(0, 1).flatten(1).T, "3": out[3], "5": out[5]}


def test_registry_declares_every_kind():
    """One entry per kind, the default four first; every kind says what it reveals, has an objective, and
    its header fields are placed in privacy_report.HEADER_FIELDS."""
    assert KINDS == ("top-layer", "all-layers", "spectral-all", "spectral-pairs") and RecordConfig().kinds is None
    assert list(REGISTRY) == [*KINDS, "class-diag", "norm-stats", "token-positions"]
    assert not any(REGISTRY[k].default for k in ("class-diag", "norm-stats", "token-positions"))
    assert all(k.reveals and k.name == n for n, k in REGISTRY.items())
    assert {n for n, k in REGISTRY.items()} <= {o.kind for o in OBJECTIVES.values()}
    for prof in ("quick", "tiny", "paper"):  # dfkd run records the default kinds: it runs no class-diag
        assert {"class-diag", "norm-stats", "token-positions"}.isdisjoint(objectives(RunConfig(profile=prof), "lenet5"))
    assert "noise" in objectives(RunConfig(profile="quick"), "lenet5")
    listed = [q for pats, _, _ in HEADER_FIELDS for q in pats]
    for kind in REGISTRY.values():  # each header field a kind writes has a status in a private file's header
        assert all(any(q == f or q.startswith(f.rstrip("*")) for q in listed) for f in kind.header_fields), kind.name


def test_class_diag_against_float64(tmp_path):
    """Recorded in several batches, its means and stds are float64 torch.mean / torch.std (unbiased) per class
    of each layer's output (a conv layer per channel, over samples and positions); its tensors are exactly
    those of an all-layers record with a diagonal covariance; it loads back and states what it reveals."""
    model, (x, y) = net(), data()
    cfg = RecordConfig(kinds=("class-diag", "all-layers"), cov="diag", batch_size=16)
    m = record(model, (x, y), cfg, INFO)
    assert m.kinds == ["class-diag", "all-layers"]
    assert {k: tuple(v.shape) for k, v in m.tensors.items()} == contract(m.header)
    r = rows64(model, x)
    labels = {"0": y.repeat_interleave(16), "3": y, "5": y}  # a conv map: 16 positions per sample
    for path, rows in r.items():
        got = REGISTRY["class-diag"].read(m, path)
        assert set(got) == {"mean", "std"}
        for c in range(3):
            part = rows[labels[path] == c]
            assert torch.allclose(got["mean"][c].double(), part.mean(0), rtol=1e-5, atol=1e-6), path
            assert torch.allclose(got["std"][c].double(), part.std(0), rtol=1e-4, atol=1e-6), path
        for s in ("mean", "std"):
            assert torch.equal(m.get("class-diag", s, path), m.get("all-layers", s, path))
    alone = record(model, (x, y), RecordConfig(kinds=("class-diag",)), INFO)
    assert all(k == "count" or k.startswith("class-diag/") for k in alone.tensors)
    assert alone.header["closed_form"][0]["layer"] == "0"  # the first layer is affine in the input
    back = load(save(alone, tmp_path / "d.stats.safetensors"))
    assert back.kinds == ["class-diag"]
    assert torch.equal(back.get("class-diag", "std", "3"), alone.get("class-diag", "std", "3"))


def test_class_diag_private_release_is_accounted(monkeypatch):
    """Under privacy every class-diag record is an event of the budget (sum and diagonal second moment, each
    with its clip bound as sensitivity), composed by the accountant: the file's epsilon meets the target and
    its noise scale is the accountant's calibration for exactly these records; where the bound clips nothing
    the mean and the diagonal second moment are the exact ones plus noise of their calibrated scales."""
    monkeypatch.setattr(noise, "INSECURE_TEST_NOISE_SEED", 3)
    model, (x, y) = net(), data(600)
    cfg = RecordConfig(kinds=("class-diag",), privacy=4.0, clip=(("class-diag/5", 4.0),))
    m = record(model, (x, y), cfg, INFO)
    p = m.header["privacy"]
    records = ["class-diag/0", "class-diag/3", "class-diag/5"]
    assert list(p["clip_bounds"]) == ["class-diag/5", "class-diag/0", "class-diag/3"]
    events = {e["release"]: e for e in p["events"]}
    for r in records:
        bound = p["clip_bounds"][r]["bound"]
        assert events[f"{r}: sum"]["sensitivity"] == bound
        assert events[f"{r}: second moment"]["sensitivity"] == bound ** 2
    assert set(events) == {"count"} | {f"{r}: {w}" for r in records for w in ("sum", "second moment")} | \
        {f"{r}: clip histogram" for r in records[:2]}
    assert p["epsilon"] <= 4.0 and p["scale"] == Budget.new(4.0, 1e-6, 600, records, {"class-diag/5": 4.0}).scale
    assert m.get("class-diag", "std", "0").shape == (3, 3)  # per channel, diagonal
    rows = rows64(model, x)["5"]
    assert privacy.norms(rows).max() < 4.0  # the premise: the bound clips nothing, so only noise differs
    exact = record(model, (x, y), RecordConfig(kinds=("class-diag",)), INFO)
    n_c = 200  # 600 examples, 3 classes
    err = (m.get("class-diag", "mean", "5") - exact.get("class-diag", "mean", "5")).abs().max()
    assert 0 < err < 6 * events["class-diag/5: sum"]["sigma"] / 150  # noise alone (6 sigma over n_c - 50)
    # the diagonal second moment Q / n released as std^2 + mean^2 (float64 oracle: torch's per class), against
    # its noise: 6 sigma_second / n_c per coordinate, plus what the count's noise moves Q / n by
    mean, std = m.get("class-diag", "mean", "5").double(), m.get("class-diag", "std", "5").double()
    second = torch.stack([rows[y == c].pow(2).mean(0) for c in range(3)])
    ev, count = events["class-diag/5: second moment"], events["count"]["sigma"]
    bound = 6 * ev["sigma"] / (n_c - 6 * count) + second * 6 * count / (n_c - 6 * count)
    kept = std > 0  # a variance the noise made negative is clamped at 0: there Q / n <= mean^2
    diff = (std ** 2 + mean ** 2 - second).abs()
    assert kept.sum() >= 3 and (diff[kept] < bound[kept]).all() and diff[kept].max() > 0, (diff, bound)
    assert (second - bound <= mean ** 2 + 1e-6)[~kept].all()
    assert ev["sigma"] == pytest.approx(ev["noise_multiplier"] * 16.0)  # sensitivity C^2, C = 4


def _objective(model, x, y, whiten=True, dtype=torch.float64):
    meta = record(model, (x, y), RecordConfig(kinds=("class-diag",)), INFO)
    meta.tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in meta.tensors.items()}
    return meta, make_objective("class-diag", meta, model, ReconstructConfig(whiten=whiten))


def _independent_loss(acts, labels, meta, whiten=True):
    """Per layer and class present, ``n_c [mean_d (w (m - mu))^2 + mean_d (w^2 (s - sigma^2))^2]`` with
    torch.mean / torch.var (biased) of the class's rows; ``w`` from the stored stds pooled over classes."""
    total = 0.0
    for path, a in acts.items():
        rows = a.transpose(0, 1).flatten(1).T if a.dim() == 4 else a
        lab = labels.repeat_interleave(a[0, 0].numel()) if a.dim() == 4 else labels
        mu, sd = meta.get("class-diag", "mean", path), meta.get("class-diag", "std", path)
        s = sd.mean(0)
        w = 1 / (s + 1e-3 * s.mean()) if whiten else torch.ones_like(s)
        for c in labels.unique().tolist():
            part = rows[lab == c]
            term = ((part.mean(0) - mu[c]) * w).pow(2).mean() + \
                ((part.var(0, unbiased=False) - sd[c] ** 2) * w * w).pow(2).mean()
            total = total + int((labels == c).sum()) * term
    return total


def test_class_diag_objective_zero_at_true_moments_and_its_gradient():
    """At stored moments equal to the batch's own (per class, biased variances) the loss and its gradient
    vanish; elsewhere the loss is an independent per-class computation, and its gradient with respect to
    every layer's output passes finite differences (torch.autograd.gradcheck, float64)."""
    model, (x, y) = net(), data(60)
    meta, obj = _objective(model, x, y)
    assert obj.layers() == ["0", "3", "5"] and obj.targets(y, torch.Generator()) == {}
    xb, lab = x[:12], y[:12]
    m64 = copy.deepcopy(model).double()
    with torch.no_grad(), tap(m64, obj.layers()) as got:
        m64(xb.double())
        acts = {k: v.clone() for k, v in got.items()}
    for path, a in acts.items():  # the batch's own class moments become the stored ones
        rows = a.transpose(0, 1).flatten(1).T if a.dim() == 4 else a
        rep = lab.repeat_interleave(a[0, 0].numel()) if a.dim() == 4 else lab
        meta.tensors[f"class-diag/{path}/mean"] = torch.stack([rows[rep == c].mean(0) for c in range(3)])
        meta.tensors[f"class-diag/{path}/std"] = torch.stack([rows[rep == c].var(0, unbiased=False).sqrt()
                                                              for c in range(3)])
    at_truth = make_objective("class-diag", meta, model, ReconstructConfig())
    leaves = {k: v.clone().requires_grad_() for k, v in acts.items()}
    loss = at_truth.loss(torch.zeros(12, 3, dtype=torch.float64), leaves, {}, lab)
    loss.backward()
    assert loss.item() < 1e-18 and all(v.grad.abs().max() < 1e-9 for v in leaves.values())
    meta2, _ = _objective(model, x, y)  # stored moments of the whole set: not the batch's
    for whiten in (True, False):
        obj = make_objective("class-diag", meta2, model, ReconstructConfig(whiten=whiten))
        ours = obj.loss(torch.zeros(12, 3, dtype=torch.float64), acts, {}, lab)
        assert ours.item() > 1e-6
        assert ours.item() == pytest.approx(float(_independent_loss(acts, lab, meta2, whiten)), rel=1e-10)
        keys = list(acts)

        def f(*a, obj=obj):
            return obj.loss(torch.zeros(12, 3, dtype=torch.float64), dict(zip(keys, a)), {}, lab)
        assert torch.autograd.gradcheck(f, tuple(acts[k].clone().requires_grad_() for k in keys))


def test_class_diag_objective_needs_its_kind():
    model, (x, y) = net(), data(60)
    four = record(model, (x, y), RecordConfig(kinds=("all-layers",)), INFO)
    with pytest.raises(DfkdError, match="holds no class-diag statistics .*--kinds class-diag"):
        make_objective("class-diag", four, model)
    with pytest.raises(DfkdError, match="unknown kind"):
        record(model, (x, y), RecordConfig(kinds=("class-dia",)), INFO)


def test_closed_form_notes_name_the_kind_that_gives_them(tmp_path, capsys):
    """A file holding only class-diag of a Linear-first model (784->1200-like: full column rank) gives the
    class-mean inputs exactly; the record note, dfkd inspect and the model card name class-diag, not
    all-layers, and inspect states each kind's form, never the all-layers ``cov`` it did not store."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(72, 80), nn.ReLU(), nn.Linear(80, 3)).eval()
    x, y = data(90)
    meta = record(model, (x, y), RecordConfig(kinds=("class-diag",), cov="full"), INFO)
    assert [r["class_means"] for r in meta.header["closed_form"]] == ["exact"]
    assert meta.header["layers"][0]["cov"] == "full"  # the header's cov: the all-layers record's form
    path = save(meta, tmp_path / "d.stats.safetensors")
    cli_commands._cmd_inspect(type("A", (), {"file": str(path)})())
    out = capsys.readouterr().out
    assert "note: its class-diag record of 1 gives each class's mean training input exactly (in closed form" in out
    assert out.rstrip().endswith("--kinds without class-diag") and "all-layers" not in out
    assert "1 (80,) per unit class-diag=diag" in out and "cov=" not in out
    assert f"class-diag: {REGISTRY['class-diag'].reveals}" in out
    config = {"data": {"shape": [2, 6, 6], "num_classes": 3, "mean": [0.0], "std": [1.0], "low": 0.0, "high": 1.0},
              "model": {"spec": "tiny"}, "dfkd_version": "0", "sha256": "0" * 64}
    card = model_card(config, meta, "tiny", None, None)
    assert f"| class-diag | {REGISTRY['class-diag'].reveals} |" in card
    assert "The class-diag record of 1 gives each class's mean training input exactly" in card


def test_run_refuses_objectives_of_kinds_it_does_not_record(tmp_path):
    """dfkd run records the default kinds only: an objective of another kind is refused in one line before
    any work (nothing written), naming dfkd record and dfkd reconstruct."""
    with pytest.raises(DfkdError, match=r"class-diag: dfkd run records only the default kinds \(top-layer, "
                       r"all-layers, spectral-all, spectral-pairs\); record class-diag with dfkd record --kinds "
                       r"class-diag and use dfkd reconstruct") as e:
        run(RunConfig(profile="tiny", networks=("lenet5",), objectives=("top-layer", "class-diag"),
                      out=str(tmp_path / "r")))
    assert e.value.where == "objectives" and not (tmp_path / "r").exists()
