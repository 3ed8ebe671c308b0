"""--synthesis generator: the generator network, its memory bank, its loss against an independent computation,
the online distillation's resume (bit for bit) and refusals, and the saved generator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfkd.generation as generation
from dfkd.config import DistillConfig, GeneratorConfig, ReconstructConfig
from dfkd.data import DataInfo
from dfkd.errors import DfkdError
from dfkd.generation import Bank, generate, generator_loss, load_generator, save_generator
from dfkd.generators import Generator, build
from dfkd.losses import disagreement, mode_seeking
from dfkd.objectives import make_objective
from dfkd.taps import tap
from dfkd.views import recolour

INFO = DataInfo(shape=(3, 8, 8), num_classes=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), name="t")


class BNNet(nn.Module):
    """A teacher dfkd did not define: conv, BatchNorm, GELU, a residual add, global pooling."""

    def __init__(self, c: int = 3, classes: int = 4, w: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.GELU())
        self.body = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, classes))

    def forward(self, x):
        h = self.stem(x)
        return self.head(F.gelu(h + self.body(h)))


def _teacher(seed: int = 0) -> BNNet:
    torch.manual_seed(seed)
    t = BNNet()
    with torch.no_grad():  # running statistics that are not the defaults
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return t.eval()


def _student(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 4))


def test_mode_seeking_is_the_mean_pairwise_ratio():
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(7, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    want = sum(float((x[i] - x[i + 3]).abs().mean() / (z[i] - z[i + 3]).abs().mean()) for i in range(3)) / 3
    assert mode_seeking(x, z).item() == pytest.approx(want, rel=1e-12)  # the odd last sample left out


def test_disagreement_is_the_kl_where_the_student_agrees():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.5, 0.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    p, q = t.softmax(1), s.softmax(1)
    kl = (p * (p / q).log()).sum(1)
    assert torch.allclose(disagreement(s, t), torch.stack([kl[0], kl.new_zeros(()), kl[2]]))  # row 1 disagrees


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 28, 28), (20,), (2, 6, 5)])
def test_generator_fits_the_shape_and_range_and_is_rebuilt_from_its_description(shape):
    torch.manual_seed(0)
    gen = Generator(shape, 4, latent=6, width=5, low=-1.0, high=3.0)
    z, y = torch.randn(6, 6), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        x = gen.eval()(z, y)
    assert x.shape == (6, *shape) and float(x.min()) >= -1.0 and float(x.max()) <= 3.0
    assert gen.conv == (len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0)
    again = build(gen.describe())
    again.load_state_dict(gen.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(z, y), x)
        assert not torch.equal(gen(z, torch.tensor([1, 2, 3, 0, 1, 2])), x)  # the label conditions the output


def test_bank_keeps_the_last_inputs_and_draws_only_filled_rows():
    bank = Bank(5, (2,))
    bank.add(torch.arange(6.0).view(3, 2))
    assert int(bank.filled) == 3
    drawn = bank.draw(50, torch.Generator().manual_seed(0))
    assert set(drawn[:, 0].tolist()) == {0.0, 2.0, 4.0}  # never an unfilled (zero-initialised past row 3) slot
    bank.add(torch.arange(100.0, 108.0).view(4, 2))  # wraps: 7 added into 5 slots
    assert int(bank.filled) == 5 and int(bank.pos) == 2
    assert sorted(bank.x[:, 0].tolist()) == [4.0, 100.0, 102.0, 104.0, 106.0]  # the last five
    big = Bank(2, (1,))
    big.add(torch.arange(5.0).view(5, 1))
    assert sorted(big.x[:, 0].tolist()) == [3.0, 4.0]


@pytest.mark.parametrize("views", ["none", "none+colour"])
def test_generator_loss_matches_an_independent_computation(views):
    """bn-stats + CE - disagreement - diversity, with a TV prior, a seam prior on 4 x 4 patches (on the view) and no jitter, recomputed here with hooks of
    its own, in float64; with ``+colour`` views both networks see each input recoloured (``recolour`` drawing
    from a generator of the same seed), the priors and the diversity the input itself."""
    teacher, student = _teacher().double(), _student().double().eval()
    rc = ReconstructConfig(objective="bn-stats", tv=0.3, bn_weight=0.7, views=views, patch_tv=0.2, patch=4)
    gc = GeneratorConfig(ce=1.3, disagreement=0.6, diversity=0.4)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64)
    z, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3] * 2)
    info = INFO
    objective = make_objective("bn-stats", None, teacher, rc)
    with tap(teacher, objective.layers(), inputs=objective.inputs()) as acts:
        got = generator_loss(x, z, y, teacher, student, objective, acts, info, rc, gc, torch.Generator().manual_seed(11))
    # the oracle
    mean, std = torch.tensor(info.mean, dtype=torch.float64), torch.tensor(info.std, dtype=torch.float64)
    xn = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    xv = x if views == "none" else recolour(x, torch.Generator().manual_seed(11), info.low, info.high)
    assert views == "none" or (xv - x).abs().max() > 0.05
    xvn = (xv - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0]))) for m in teacher.modules()
             if isinstance(m, nn.BatchNorm2d)]
    logits = teacher(xvn)
    for h in hooks:
        h.remove()
    bn = sum(torch.linalg.vector_norm(a.mean((0, 2, 3)) - m.running_mean)
             + torch.linalg.vector_norm(a.var((0, 2, 3), unbiased=False) - m.running_var) for m, a in seen)
    ce = F.cross_entropy(logits, y)
    tv = ((xn[..., 1:, :] - xn[..., :-1, :]).abs().flatten(1).mean(1)
          + (xn[..., :, 1:] - xn[..., :, :-1]).abs().flatten(1).mean(1)).sum()
    seams = ((xvn[..., 4, :] - xvn[..., 3, :]).abs().flatten(1).mean(1)  # 8 x 8 in 4 x 4 patches: one seam each
             + (xvn[..., :, 4] - xvn[..., :, 3]).abs().flatten(1).mean(1)).sum()  # way, as the teacher sees them
    p, s = logits.softmax(1), student(xvn)
    kl = (p * (p.log() - s.log_softmax(1))).sum(1) * (s.argmax(1) == logits.argmax(1))
    ms = torch.stack([(xn[i] - xn[i + 4]).abs().mean() / (z[i] - z[i + 4]).abs().mean() for i in range(4)]).mean()
    want = 0.7 * bn + 1.3 * ce + ce + (0.3 * tv + 0.2 * seams) / 8 - 0.6 * kl.mean() - 0.4 * ms  # bn-stats carries its own CE
    assert len(seen) == 2 and got.item() == pytest.approx(want.item(), rel=1e-10)


def _run(tmp_path, iterations=4, restart=False, views="none", **gc):
    tmp_path.mkdir(parents=True, exist_ok=True)
    teacher, student = _teacher(), _student()
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    test = (x, torch.arange(12) % 4)
    hist, gen = generate(teacher, None, student, INFO, ReconstructConfig(objective="bn-stats", jitter=1, tv=0.05,
                                                                         views=views),
                         DistillConfig(batch_size=6, lr=0.01, augment="affine+cutmix+colour", schedule="cosine"),
                         GeneratorConfig(**dict(dict(iterations=iterations, batch_size=8, latent=4, width=4, bank=20,
                                                     student_steps=2, eval_every=2), **gc)),
                         test=test, state_path=tmp_path / "state.safetensors", settings={"who": "test"},
                         restart=restart)
    return hist, gen, student


def test_generate_resumes_bit_for_bit_and_refuses_other_settings(tmp_path, monkeypatch):
    whole_hist, whole_gen, whole_student = _run(tmp_path / "a")
    assert [h["epoch"] for h in whole_hist] == [2, 4] and all(0 <= h["test_accuracy"] <= 1 for h in whole_hist)
    saves = []
    real = generation.save_state

    def crash_after_first(*a, **k):
        real(*a, **k)
        saves.append(a[3])
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "save_state", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b")
    assert saves == [2]
    saves.clear()
    monkeypatch.setattr(generation, "save_state", lambda *a, **k: saves.append(a[3]) or real(*a, **k))
    hist, gen, student = _run(tmp_path / "b")  # resumed after step 2: only step 4's state saved (not 2 again)
    assert saves == [4], saves
    monkeypatch.setattr(generation, "save_state", real)
    assert [h["epoch"] for h in hist] == [2, 4]
    assert [(h["loss"], h["student_loss"], h["test_accuracy"]) for h in hist] == \
        [(h["loss"], h["student_loss"], h["test_accuracy"]) for h in whole_hist]
    for a, b in ((gen, whole_gen), (student, whole_student)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(DfkdError, match="other settings.*diversity"):
        _run(tmp_path / "b", diversity=0.1)
    _run(tmp_path / "b", diversity=0.1, restart=True)  # started over


def test_generator_is_saved_and_loaded_with_its_checksum(tmp_path):
    torch.manual_seed(0)
    gen = Generator((3, 8, 8), 4, latent=4, width=4)
    path = save_generator(gen.eval(), tmp_path / "g.safetensors", objective="bn-stats")
    again, doc = load_generator(path)
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert torch.equal(again(z, y), gen(z, y)) and doc["objective"] == "bn-stats"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DfkdError, match="sha256"):
        load_generator(path)


@pytest.mark.parametrize("bad, match", [(dict(iterations=0), "iterations"), (dict(batch_size=1), "batch"),
                                         (dict(batch_size=7), "even"), (dict(diversity=-1.0), "finite and >= 0"),
                                         (dict(ce=float("nan")), "finite and >= 0"), (dict(lr=1e38), "float32")])
def test_generate_refuses_bad_settings(tmp_path, bad, match):
    with pytest.raises(DfkdError, match=match):
        _run(tmp_path, **bad)


def test_a_generator_trained_under_seen_views_is_reproducible_and_another_one(tmp_path):
    """``views="affine+colour"`` end to end: one seed gives one generator, not the one made without views."""
    made = [_run(tmp_path / str(i), views=v)[1].state_dict()
            for i, v in enumerate(("affine+colour", "affine+colour", "none"))]
    assert all(torch.equal(made[0][k], made[1][k]) for k in made[0])
    assert any(not torch.equal(made[0][k], made[2][k]) for k in made[0])


def test_generate_refuses_objectives_that_cannot_train_it():
    with pytest.raises(DfkdError, match="noise"):
        generate(_teacher(), None, _student(), INFO, ReconstructConfig(objective="noise"))
    with pytest.raises(DfkdError, match="views: 'affine[+]mix' is not shift, affine or none"):
        generate(_teacher(), None, _student(), INFO, ReconstructConfig(objective="bn-stats", views="affine+mix"))


def test_a_finished_state_is_returned_as_it_is_and_records_fall_on_the_last_step(tmp_path, monkeypatch):
    """5 steps recorded every 2: records after 2, 4 and 5. Run again on its finished state, nothing is trained
    (no generator step is taken) and the same generator, student and history come back."""
    hist, gen, student = _run(tmp_path, iterations=5)
    assert [h["epoch"] for h in hist] == [2, 4, 5] and all(h["seconds"] > 0 for h in hist)
    monkeypatch.setattr(generation, "generator_loss", lambda *a, **k: pytest.fail("a finished run trained again"))
    again, gen2, student2 = _run(tmp_path, iterations=5)
    assert again == hist
    for a, b in ((gen, gen2), (student, student2)):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


class BNStudent(nn.Sequential):
    def __init__(self):
        torch.manual_seed(2)
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 4))


def test_the_generator_step_changes_neither_the_student_nor_the_teacher():
    """With no student step, a generator seeking disagreement leaves the student's weights and BatchNorm
    statistics exactly as they were, and the frozen teacher too; the generator itself moves."""
    teacher, student = _teacher(), BNStudent()
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    hist, gen = generate(teacher, None, student, INFO, ReconstructConfig(objective="bn-stats"),
                         DistillConfig(batch_size=6),
                         GeneratorConfig(iterations=3, batch_size=8, latent=4, width=4, bank=16, student_steps=0,
                                         disagreement=2.0, diversity=1.0, eval_every=3))
    assert all(torch.equal(v, s0[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    torch.manual_seed(0)
    fresh = Generator(INFO.shape, 4, 4, 4)
    params = dict(fresh.named_parameters())  # its weights, not its BatchNorm statistics (a forward moves those)
    assert any(not torch.equal(p, params[k]) for k, p in gen.named_parameters())
    assert [h["student_loss"] for h in hist] == [0.0]


def test_an_anchored_generator_starts_at_each_class_mean_input(monkeypatch):
    """Given a base (the class-mean inputs the statistics reveal), a generator whose net outputs zero gives each
    class's base exactly, within the range (clipped to 2..98 % of it); ``generate`` anchors on what
    ``revealed_means`` returns, and init class-mean without revealed means is refused in one line."""
    base = torch.rand(4, *INFO.shape, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    gen = Generator(INFO.shape, 4, latent=4, width=4, base=base)
    with torch.no_grad():
        gen.body[-1].weight.zero_()
        gen.body[-1].bias.zero_()
        got = gen.eval()(torch.randn(8, 4), torch.tensor([0, 1, 2, 3] * 2))
    assert torch.allclose(got, base.repeat(2, 1, 1, 1), atol=1e-6)
    again = build(gen.describe())
    again.load_state_dict(gen.state_dict())
    assert again.anchored and torch.equal(again.base, gen.base)
    from types import SimpleNamespace
    from dfkd.files import weights_sha256
    teacher = _teacher()
    meta = SimpleNamespace(header={"teacher_sha256": weights_sha256(teacher.state_dict())}, num_classes=4, path=None)
    seen = []
    monkeypatch.setattr(generation, "revealed_means", lambda t, m: seen.append(m) or base)
    small = dict(iterations=1, batch_size=8, latent=4, width=4, bank=16, eval_every=1)
    for init, anchored in (("auto", True), ("noise", False)):
        _, g2 = generate(teacher, meta, _student(), INFO, ReconstructConfig(objective="bn-stats", init=init),
                         DistillConfig(batch_size=6), GeneratorConfig(**small))
        assert g2.anchored == anchored
    assert seen == [meta]  # asked once, for init auto; never for noise
    _, g3 = generate(teacher, None, _student(), INFO, ReconstructConfig(objective="bn-stats"),
                     DistillConfig(batch_size=6), GeneratorConfig(**small))
    assert not g3.anchored and seen == [meta]  # without statistics nothing is revealed
    other = SimpleNamespace(header={"teacher_sha256": "0" * 64}, num_classes=4, path="o.stats.safetensors")
    with pytest.raises(DfkdError, match="another teacher"):
        generate(teacher, other, _student(), INFO, ReconstructConfig(objective="bn-stats"))
    with pytest.raises(DfkdError, match="reveal no class mean"):
        generate(_teacher(), None, _student(), INFO, ReconstructConfig(objective="bn-stats", init="class-mean"))


@pytest.mark.parametrize("change, match", [
    (dict(classes=10 ** 9), "classes"), (dict(shape=[3, -1, 8]), "shape"), (dict(shape="388"), "shape"),
    (dict(width=True), "width"), (dict(latent=2.9), "latent"), (dict(high=float("inf")), "finite"),
    (dict(anchored=1), "anchored"), (dict(shape=[3, 4096, 4096]), "shape"), (dict(low=10 ** 400), "finite"),
    (dict(shape=[1, 4096, 4096], latent=4096, width=4096), "parameters"),
    (dict(shape=[1, 4096, 4096], latent=1, width=1), "do not fit its description")])
def test_a_malformed_generator_description_is_one_line_before_anything_is_built(tmp_path, change, match):
    """A generator file someone sent: its description is checked field by field, within bounds, before a
    network is built from it (no allocation a file asks for), and refused in one line naming the file."""
    import json
    from dfkd.resume import save_checked
    desc = dict(Generator((3, 8, 8), 4, 4, 4).describe(), **change)
    path = tmp_path / "g.safetensors"
    save_checked(path, {"x": torch.zeros(1)}, json.dumps({"format": "dfkd-generator", "version": 1,
                                                          "generator": desc}))
    with pytest.raises(DfkdError, match=match) as e:
        load_generator(path)
    assert str(path) in str(e.value.where) and "\n" not in str(e.value)


def test_run_under_the_generator_keeps_to_objectives_that_can_train_one(monkeypatch):
    """dfkd run --synthesis generator: a profile's objectives less noise and dropout (refused when asked for by
    name, in one line, before anything runs), and the optimise mode's sizes refused."""
    from dfkd.run_config import RunConfig
    from dfkd.profiles import check, objectives
    every = objectives(RunConfig(), "lenet5")
    assert {"noise", "all-layers-dropout"} <= set(every)
    assert objectives(RunConfig(synthesis="generator"), "lenet5") == \
        tuple(o for o in every if o not in ("noise", "all-layers-dropout"))
    for cfg, where in ((RunConfig(synthesis="generator", objectives=("top-layer", "noise")), "objectives"),
                       (RunConfig(synthesis="generator", epochs=3), "epochs"),
                       (RunConfig(synthesis="generator", steps=3), "steps"),
                       (RunConfig(iterations=3), "iterations")):
        with pytest.raises(DfkdError) as e:
            check(cfg)
        assert e.value.where == where
    check(RunConfig(synthesis="generator"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused before anything is trained
    with pytest.raises(DfkdError, match="one process") as e:
        check(RunConfig(synthesis="generator"))
    assert e.value.where == "synthesis"
    check(RunConfig())  # the optimise mode scales out


def test_the_curve_gives_a_generators_student_and_an_epoch_student_each_its_own_budget():
    """results.curve: beside a generator's student (800 steps) a 30-epoch student's last point also ends at the
    right edge; without one the x axis stays in epochs."""
    import re
    from dfkd.results import curve
    epochs = {"teacher": "t", "objective": "real-data", "history": [0.5, 0.9], "history_epochs": [15, 30]}
    gen = {"teacher": "t", "objective": "bn-stats", "history": [0.4, 0.8], "history_epochs": [400, 800],
           "synthesis": "generator"}

    def last_x(svg: str) -> list[float]:
        return [float(p.split()[-1].split(",")[0]) for p in re.findall(r'points="([^"]+)"', svg)]
    mixed = curve([epochs, gen]).decode()
    assert last_x(mixed)[0] == last_x(mixed)[1] and "share of each student's budget" in mixed
    alone = curve([epochs]).decode()
    assert "epoch (of 30)" in alone and last_x(alone) == last_x(mixed)[:1]
    # each line's last point is marked, so a student measured once (a one-epoch run) shows as a dot
    ends = [p.split()[-1] for p in re.findall(r'points="([^"]+)"', mixed)]
    assert re.findall(r'<circle cx="([^"]+)" cy="([^"]+)"', mixed) == [tuple(e.split(",")) for e in ends]
    once = curve([dict(epochs, history=[0.7], history_epochs=[1])]).decode()
    assert once.count("<circle") == 1 and once.count("<polyline") == 1


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (20,), (2, 6, 5)])
def test_a_descriptions_parameter_count_is_the_networks(shape):
    """generators.parameters, which bounds what a file may describe, counts what the network holds."""
    from dfkd.generators import parameters
    for classes, latent, width in ((10, 64, 32), (4, 4, 4), (7, 3, 5)):
        net = Generator(shape, classes, latent, width)
        assert parameters(list(shape), classes, latent, width) == sum(p.numel() for p in net.parameters())
