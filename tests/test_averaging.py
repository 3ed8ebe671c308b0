"""The student's weights averaged over the last epochs (``--average``): the kept model against an independent
mean of the weights, its BatchNorm statistics against the last epoch's views' own moments batch by batch, a
resumed run against an uninterrupted one, and the refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dfkd.averaging import Average, epochs_averaged
from dfkd.cli import main
from dfkd.config import DistillConfig
from dfkd.distillation import distill
from dfkd import loop
from dfkd.loop import fit

N, B = 64, 32  # two batches an epoch


def _net() -> nn.Module:
    torch.manual_seed(3)  # dropout: the average must leave the running weights' random draws as they were
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(4, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(N, 1, 8, 8, generator=g), torch.randint(0, 3, (N,), generator=g)


def _ce(m, x, y, _g):
    return F.cross_entropy(m(x), y)


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in m.named_parameters()}


def _fit(net, epochs=6, **kw):
    return fit(net, _data(), _ce, epochs=epochs, batch_size=B, lr=0.05, seed=0, progress=False, **kw)


def test_the_kept_model_is_the_mean_of_the_last_epochs_weights_and_the_run_is_not_perturbed():
    snaps = []
    plain = _net()
    _fit(plain, on_epoch=lambda m: snaps.append(_params(m)) or {})
    averaged = _net()
    history = _fit(averaged, average=0.5,
                   on_epoch=lambda m: {"weight_sum": float(sum(v.sum() for v in _params(m).values()))})
    # epochs 4, 5, 6 of 6 (0.5 x 6 = 3): the mean in float64 of the plain run's weights after each of them
    for name, p in averaged.named_parameters():
        mean = sum(s[name] for s in snaps[3:]) / 3
        assert torch.allclose(p.double(), mean, atol=1e-6), name
        assert not torch.allclose(p.double(), snaps[-1][name], atol=1e-4), f"{name} is the last epoch's"
    # the running weights logged beside the average's are the plain run's own, epoch for epoch (dropout included)
    for rec, s in zip(history, snaps):
        got = rec.get("running_weight_sum", rec["weight_sum"])
        assert got == pytest.approx(float(sum(v.sum() for v in s.values())), rel=1e-9)
    assert ["running_weight_sum" in h for h in history] == [False] * 3 + [True] * 3
    assert not averaged.training


def test_the_averages_batchnorm_statistics_are_the_last_views_moments_batch_by_batch(monkeypatch):
    seen = []

    def prepare(xe, ye, g):  # views unlike the stored inputs, other every epoch
        xv = xe * (1 + torch.rand(len(xe), 1, 1, 1, generator=g)) + torch.rand(1, generator=g)
        seen.append(xv)
        return xv, ye

    net = _net()
    fit(net, _data(), _ce, epochs=4, batch_size=B, lr=0.05, seed=0, progress=False, average=0.5, prepare=prepare)
    with torch.no_grad():  # the first BatchNorm's input under the averaged convolution, each batch of the last views
        pre = [net[0](xb).double() for xb in seen[-1].split(B)]
    net_chunk = _net()  # an epoch of two chunks of one batch each: the first chunk's moments alone
    monkeypatch.setattr("dfkd.loop.CHUNK", B)
    seen.clear()
    fit(net_chunk, _data(), _ce, epochs=4, batch_size=B, lr=0.05, seed=0, progress=False, average=0.5, prepare=prepare)
    assert len(seen) == 8
    with torch.no_grad():
        first = net_chunk[0](seen[-2]).double()
    assert torch.allclose(net_chunk[1].running_mean.double(), first.mean(dim=(0, 2, 3)), atol=1e-5)
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in pre])
    variances = torch.stack([p.transpose(0, 1).reshape(4, -1).var(dim=1) for p in pre])  # unbiased, as BatchNorm's
    bn = net[1]
    assert torch.allclose(bn.running_mean.double(), means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var.double(), variances.mean(0), atol=1e-5)
    whole = torch.cat(pre).transpose(0, 1).reshape(4, -1).var(dim=1)  # not the whole chunk's variance in one
    assert not torch.allclose(bn.running_var.double(), whole, atol=1e-5)


class Stop(Exception):
    pass


def _stop_at(call: int):
    seen = []

    def on_epoch(m):
        seen.append(1)
        if len(seen) == call:
            raise Stop
        return {}
    return on_epoch


@pytest.mark.parametrize("call", [3, 6], ids=["before-the-average", "inside-it"])
def test_a_resumed_average_equals_an_uninterrupted_one(tmp_path, monkeypatch, call):
    """on_epoch runs once an epoch, twice (running, average) from epoch 4: call 3 stops epoch 3 before its state is
    saved (epoch 2's: nothing averaged yet), call 6 epoch 5 (epoch 4's: a mean of one). The resumed run trains
    only the epochs after the saved one (the states it saves say which), the finished one none."""
    whole = _net()
    _fit(whole, average=0.5, state_path=tmp_path / "a.state.safetensors")
    state = tmp_path / "b.state.safetensors"
    with pytest.raises(Stop):
        _fit(_net(), average=0.5, state_path=state, on_epoch=_stop_at(call))
    real, saved = loop.save_state, []
    monkeypatch.setattr(loop, "save_state", lambda *a, **k: saved.append(a[3]) or real(*a, **k))
    for want in ({3: [3, 4, 5, 6], 6: [5, 6]}[call], []):  # resumed; then on the finished state (as a kill while
        saved.clear()                                        # saving the model leaves it): nothing redone
        resumed = _net()
        assert len(_fit(resumed, average=0.5, state_path=state)) == 6 and saved == want, saved
        for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(Exception, match="other settings"):  # the share is a setting: another is refused
        _fit(_net(), average=0.25, state_path=state)


def test_distill_keeps_the_average_and_logs_both_accuracies():
    x, y = _data()
    logits = _net().eval()(x).detach()
    last, averaged = _net(), _net()
    plain = distill(last, (x, logits), None, DistillConfig(epochs=4, batch_size=B, augment="none", temperature=4.0),
                    test=(x, y))
    history = distill(averaged, (x, logits), None, DistillConfig(epochs=4, batch_size=B, augment="none",
                                                                 temperature=4.0, average=0.5), test=(x, y))
    assert [("test_accuracy" in h, "running_test_accuracy" in h) for h in history] == \
        [(True, False)] * 2 + [(True, True)] * 2
    assert [h["running_test_accuracy"] for h in history[2:]] == [h["test_accuracy"] for h in plain[2:]]
    assert all(not torch.equal(a, b) for a, b in zip(last.parameters(), averaged.parameters()))
    with torch.no_grad():
        kept = (averaged(x).argmax(1) == y).float().mean().item()
    assert history[-1]["test_accuracy"] == pytest.approx(kept)


@pytest.mark.parametrize("share,epochs,problem", [(-0.1, 4, "must be in [0, 1)"), (1.0, 4, "must be in [0, 1)"),
                                                  (float("nan"), 4, "must be in [0, 1)"),
                                                  (0.2, 4, "0.2 of 4 epochs averages 1: give a share that covers at "
                                                   "least two epochs")])
def test_a_share_that_averages_nothing_is_refused(share, epochs, problem):
    with pytest.raises(Exception, match=problem.replace("[", "\\[").replace(")", "\\)")):
        Average(_net(), share, epochs)
    x, _ = _data()
    with pytest.raises(Exception, match=problem.replace("[", "\\[").replace(")", "\\)")):
        distill(_net(), (x, torch.zeros(N, 3)), None, DistillConfig(epochs=epochs, augment="none", average=share))


def test_the_share_rounds_half_up():
    assert [epochs_averaged(0.5, e) for e in (3, 4, 5)] == [2, 2, 3]
    assert epochs_averaged(0.25, 10) == 3 and epochs_averaged(0.5, 400) == 200


def test_run_refuses_an_average_it_could_not_make(capsys):
    for argv, needle in ((["--synthesis", "generator", "--average", "0.5"], "dfkd: --average: averages epochs on a "
                          "synthetic set, which --synthesis generator does not make"),
                         (["--profile", "paper", "--average", "0.5"], "dfkd: --average: the paper profile keeps the "
                          "last epoch's student"),
                         (["--average", "1"], "dfkd: --average: the share of the epochs to average must be in [0, 1)"),
                         (["--epochs", "3", "--average", "0.1"], "dfkd: --average: 0.1 of 3 epochs averages 0")):
        capsys.readouterr()
        code = main(["run", "--networks", "lenet5", "--out", "/nonexistent/never", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_the_curve_draws_the_weights_own_accuracy_dashed_where_they_are_averaged():
    """results.curve: a student kept as an average gets a second, dashed line at its own weights' accuracy, on the
    same axes as the kept line (the same x for the same epoch, the same y for the same accuracy), its last point
    ringed; beside a generator's student too (each line on its own budget's scale); a malformed block draws nothing."""
    import re
    from dfkd.results import curve
    row = {"teacher": "t", "objective": "bn-stats", "history": [0.5, 0.6, 0.7, 0.8], "history_epochs": [10, 20, 30, 40]}
    plain = curve([row]).decode()
    assert "stroke-dasharray" not in plain and "own" not in plain
    averaged = dict(row, running={"epochs": [30, 40], "accuracy": [0.7, 0.5]})
    gen = {"teacher": "t", "objective": "bn-stats", "history": [0.4, 0.8], "history_epochs": [400, 800],
           "synthesis": "generator"}
    for rows in ([averaged], [averaged, gen]):
        svg = curve(rows).decode()
        lines = [[tuple(map(float, p.split(","))) for p in pts.split()] for pts in re.findall(r'points="([^"]+)"', svg)]
        solid, dashed = lines[:2]
        assert svg.count('stroke-dasharray="4 3"') == 1 and svg.count("(- - own)") == 1
        assert dashed == [solid[2], (solid[3][0], solid[0][1])]  # epoch 30 at 70%, epoch 40 at 50%
        assert solid[-1][0] == lines[-1][-1][0]  # the last epoch and the generator's last step both at the right edge
        ring = re.search(r'<circle cx="([^"]+)" cy="([^"]+)" r="2.5" fill="none"', svg).groups()
        assert tuple(map(float, ring)) == dashed[-1]
    for bad in ({"epochs": [30, 40], "accuracy": [0.7]}, {"epochs": [], "accuracy": []}, [30, 40]):
        svg = curve([dict(row, running=bad)]).decode()
        assert "stroke-dasharray" not in svg and "own" not in svg
