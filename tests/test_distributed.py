"""Many processes on this CPU: two ranks with the gloo backend, started from the test itself with a
file rendezvous (``DFKD_DIST_INIT=file://...``, the variables torchrun would set), against one
process. Sharded reconstruction must write the same bytes for every shard; data-parallel
distillation must reach the single process's weights (the same global batches, the gradient
averaged over the ranks) up to float summation order."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfkd.synthetic import SyntheticSet


def launch(args: list[str], world: int, rdzv: Path, extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """``world`` processes of ``python -m dfkd ARGS`` as torchrun would start them (one thread each)."""
    procs = []
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                   DFKD_DIST_INIT=f"file://{rdzv}", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "dfkd", *args, "--quiet"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def single(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "dfkd", *args, "--quiet"], env=env, capture_output=True, text=True,
                          timeout=600)


def shard_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.safetensors"))}


@pytest.mark.slow  # 28 s: six processes; the sharding it relies on is checked in CI by the tests beside it
def test_rank_split_without_a_group_and_resume(world, tmp_path):
    """--rank/--world-size: separate jobs sharing a folder, no process group; the set completes when
    the last share is done, and a share re-run after being interrupted does only what is missing."""
    args = ["reconstruct", "--teacher", str(world.teacher), "--objective", "all-layers", "--images", "50",
            "--batch-size", "10", "--steps", "5", "--out", str(tmp_path / "split")]
    ref = single(args[:-1] + [str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    r1 = single(args + ["--rank", "1", "--world-size", "3"])
    assert r1.returncode == 0 and "every rank" in r1.stdout, r1.stderr
    assert sorted(shard_hashes(tmp_path / "split")) == ["shard-00001.safetensors", "shard-00004.safetensors"]
    assert not json.loads((tmp_path / "split" / "manifest.json").read_text())["complete"]
    (tmp_path / "split" / "shard-00004.safetensors").unlink()  # as if killed before its last shard
    for r in (0, 2, 1):
        res = single(args + ["--rank", str(r), "--world-size", "3"])
        assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "split" / "manifest.json").read_text())["complete"]
    assert shard_hashes(tmp_path / "split") == shard_hashes(tmp_path / "ref")
    bad = single(args + ["--rank", "3", "--world-size", "3"])
    assert bad.returncode == 2 and bad.stderr.startswith("dfkd: --rank: ")


def test_ddp_distillation_matches_one_process(world, tmp_path):
    """One epoch on the stored logits (no augmentation, so the two runs see the same global batches):
    the two ranks' averaged gradients give the single process's weights up to summation order, and
    both runs moved every tensor away from the student's seeded start by what Adam's steps allow."""
    from dfkd.models import build_model
    lr, batch = 1e-3, 4
    args = ["distill", "--synthetic", str(world.synthetic), "--student", "lenet5-half", "--epochs", "1",
            "--batch-size", str(batch), "--augment", "none", "--lr", str(lr), "--schedule", "constant", "--seed", "0"]
    one = single(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    ranks = launch(args + ["--out", str(tmp_path / "two")], 2, tmp_path / "rdzv")
    assert all(r.returncode == 0 for r in ranks), [r.stderr for r in ranks]
    w1, w2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    # the start, made here as distill_file makes it: the global RNG seeded with --seed, then the student built
    synth = SyntheticSet(world.synthetic).open()
    torch.manual_seed(0)
    w0 = build_model("lenet5-half", synth.info)[0].state_dict()
    assert w1.keys() == w2.keys() == w0.keys()
    steps = -(-len(synth) // batch)  # 20 inputs: 5 global batches of 4, 2 inputs a rank
    # Adam's step t moves a coordinate by at most lr * r_t, r_t = |m_hat| / sqrt(v_hat) bounded (Cauchy-Schwarz)
    # by (1-b1)/(1-b1^t) * sqrt((1-b2^t)/(1-b2)) * sqrt(sum_{k<t} (b1^2/b2)^k): 1.0 at t=1, 1.011 at t=5
    b1, b2 = 0.9, 0.999
    reach = lr * sum((1 - b1) / (1 - b1 ** t) * ((1 - b2 ** t) / (1 - b2)) ** 0.5
                     * sum((b1 * b1 / b2) ** k for k in range(t)) ** 0.5 for t in range(1, steps + 1))
    for k in w0:
        moved = (w1[k] - w0[k]).abs().max().item()
        # above: every tensor trained (the first step alone moves each coordinate with a gradient by ~lr);
        # below: w0 really is the start (another seed's start lies ~0.1 away, not 5e-3)
        assert lr / 2 < moved <= reach * (1 + 1e-4), (k, moved, reach)
    # the same 5 steps, the only difference being the order in which each gradient's 4 per-input terms are
    # summed (2 a rank, then all-reduced): a few float32 roundings (~1e-7 relative) a step. Adam's step
    # lr * m_hat / (sqrt(v_hat) + eps) passes a relative change of g on as one of the step, so a coordinate
    # may differ by ~steps * lr * 1e-6 (5e-9): nearly all stay within lr * 1e-4. No bound below a step
    # holds for every coordinate, though: Adam divides g by its own size, so where the 4 terms of a
    # gradient cancel to the level of their rounding (and that level is above eps, terms >~ 0.1) the two
    # orders may give steps of opposite sign, ~2 lr apart, on any kernel. The only sure bound is that
    # both runs lie within ``reach`` of the same start; beyond it, only a few coordinates (such exact
    # cancellations) may exceed lr * 1e-2 and a few more lr * 1e-4. Training without the all-reduce, or
    # on the wrong rows, moves nearly every coordinate by ~lr, far above both.
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert diff.max().item() <= 2 * reach * (1 + 1e-4), [(k, (w1[k] - w2[k]).abs().max().item()) for k in w1]
    assert (diff > lr * 1e-2).float().mean().item() < 2e-4, (diff > lr * 1e-2).sum()
    assert (diff > lr * 1e-4).float().mean().item() < 1e-3, (diff > lr * 1e-4).sum()
    assert not (tmp_path / "two.state.safetensors").exists()  # rank 0 wrote, and removed, the only checkpoint


@pytest.mark.slow  # 17 s: train and record under two ranks and sharded shards run in CI
def test_run_under_two_ranks(world, tmp_path):
    """``dfkd run`` as torchrun would start it: the teacher and statistics of an earlier run, the
    shards split over two ranks (the same bytes as one process's), every student data-parallel,
    rank 0 alone writing the results."""
    base = ["run", "--profile", "tiny", "--networks", "lenet5", "--objectives", "top-layer,all-layers",
            "--no-baselines", "--images", "60", "--steps", "5", "--data", world.data]
    first = single(base + ["--out", str(tmp_path / "one")])
    assert first.returncode == 0, first.stderr
    ranks = launch(base + ["--teachers", str(tmp_path / "one"), "--out", str(tmp_path / "two")], 2, tmp_path / "rdzv")
    assert all(r.returncode == 0 for r in ranks), [r.stderr for r in ranks]
    for obj in ("top-layer", "all-layers"):
        assert shard_hashes(tmp_path / "two" / "lenet5" / "synthetic" / obj) == \
            shard_hashes(tmp_path / "one" / "lenet5" / "synthetic" / obj)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    assert [r["objective"] for r in two] == ["top-layer", "all-layers"]
    for a, b in zip(one, two):  # one epoch of the same global batches: the same student within noise
        assert abs(a["accuracy"] - b["accuracy"]) < 0.05, (a["accuracy"], b["accuracy"])


def test_killed_ranks_resume_at_their_first_missing_shard(world, tmp_path):
    """Both ranks of a job killed (SIGKILL) mid-work, each during its third write (``dfkd.faults``,
    no clock involved); the job started again finishes the set, redoing no finished shard, with the
    same bytes as one process."""
    args = ["reconstruct", "--teacher", str(world.teacher), "--objective", "all-layers", "--images", "80",
            "--batch-size", "10", "--steps", "10"]
    ref = single(args + ["--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "job"
    procs = []
    for r in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                   DFKD_DIST_INIT=f"file://{tmp_path / 'rdzv1'}", DFKD_TEST_CRASH_AT="3@shard-*")
        procs.append(subprocess.Popen([sys.executable, "-m", "dfkd", *args, "--out", str(out), "--quiet"], env=env,
                                      stderr=subprocess.DEVNULL))
    assert [p.wait(timeout=600) for p in procs] == [-9, -9]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert len(before) == 4  # two finished shards a rank; the third's temp file is left
    assert len(list(out.glob(".shard-*.dfkd-tmp"))) == 2
    ranks = launch(args + ["--out", str(out)], 2, tmp_path / "rdzv2")
    assert all(r.returncode == 0 for r in ranks), [r.stderr for r in ranks]
    assert shard_hashes(out) == shard_hashes(tmp_path / "ref")
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.glob("shard-*.safetensors") if p.name in before)


@pytest.mark.slow  # slow (36 s): two ranks on a user model; the two-rank train/record/DDP tests stay in the default run
def test_own_bn_model_on_colour_folder_two_ranks(colour_dir, tmp_path):
    """A model dfkd did not define (BatchNorm, residual, GELU, global pooling) on 3-channel images
    from a folder: bn-stats shards the same bytes on two ranks as on one, and the student (BN-free
    GELU CNN) distilled data-parallel matches one process on stored logits, also with its weights averaged
    over two epochs (``--average``)."""
    from dfkd.checkpoint import save_model
    from dfkd.sources import open_data
    from dfkd.models import build_model
    from tests.conftest import OWN
    data = open_data(f"folder:{colour_dir}", normalize="auto")
    torch.manual_seed(0)
    model, info = build_model(f"{OWN}:teacher", data.info, in_channels=3, width=8)
    model.train()
    with torch.no_grad():  # BatchNorm running statistics from real images, as training would leave them
        for i in range(0, 512, 128):
            model(data.info.to_model(data.train.batch(torch.arange(i, i + 128))[0]))  # raw batches, normalised
    save_model(model.eval(), tmp_path / "own", f"{OWN}:teacher", {"in_channels": 3, "width": 8}, info)
    rec = ["reconstruct", "--teacher", str(tmp_path / "own"), "--code", str(OWN), "--objective", "bn-stats",
           "--images", "40", "--batch-size", "10", "--steps", "4", "--jitter", "1"]
    one = single(rec + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = launch(rec + ["--out", str(tmp_path / "two")], 2, tmp_path / "rdzv")
    assert all(r.returncode == 0 for r in two), [r.stderr for r in two]
    assert len(shard_hashes(tmp_path / "one")) == 4 and shard_hashes(tmp_path / "one") == shard_hashes(tmp_path / "two")
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())  # rank 0 listed every rank's shards
    assert m["complete"] and [s["index"] for s in m["shards"]] == list(range(4))
    assert all(s["seconds"] > 0 and s["n"] == 10 for s in m["shards"])
    x1, y1, _ = SyntheticSet(tmp_path / "one").open().load()
    x2, y2, _ = SyntheticSet(tmp_path / "two").open().load()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    dist = ["distill", "--synthetic", str(tmp_path / "two"), "--student", f"{OWN}:student", "--student-args",
            '{"in_channels": 3, "width": 8}', "--epochs", "1", "--batch-size", "8", "--augment", "none",
            "--schedule", "constant", "--data", f"folder:{colour_dir}"]
    e = dist.index("--epochs") + 1  # and with the weights averaged over two epochs (--average)
    made = []
    for tag, argv in (("s", dist), ("a", dist[:e] + ["2"] + dist[e + 1:] + ["--average", "0.75"])):
        one = single(argv + ["--out", str(tmp_path / f"{tag}1")])
        assert one.returncode == 0, one.stderr
        two = launch(argv + ["--out", str(tmp_path / f"{tag}2")], 2, tmp_path / f"rdzv-{tag}")
        assert all(r.returncode == 0 for r in two), [r.stderr for r in two]
        w1, w2 = load_file(tmp_path / f"{tag}1.safetensors"), load_file(tmp_path / f"{tag}2.safetensors")
        assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in w1)
        made.append(w1)
    # the average is the mean of the weights after epochs 1 and 2 (a constant lr: epoch 1 is the one-epoch run's)
    two_epochs = single(dist[:e] + ["2"] + dist[e + 1:] + ["--out", str(tmp_path / "p1")])
    assert two_epochs.returncode == 0, two_epochs.stderr
    w2 = load_file(tmp_path / "p1.safetensors")
    assert all(torch.allclose(made[1][k], (made[0][k] + w2[k]) / 2, atol=1e-5, rtol=1e-4) for k in w2)
    assert any(not torch.allclose(made[1][k], w2[k], atol=1e-4) for k in w2)


def test_train_and_record_under_two_ranks(world, tmp_path):
    """``dfkd train`` data-parallel and ``dfkd record`` (rank 0 records, the other waits) under two
    ranks: one teacher and one statistics file, bound to each other."""
    from dfkd.checkpoint import load_model
    from dfkd.metadata import KINDS, load
    r = launch(["train", "--model", "lenet5", "--data", world.data, "--epochs", "1", "--out", str(tmp_path)], 2,
               tmp_path / "rdzv")
    assert all(x.returncode == 0 for x in r), [x.stderr for x in r]
    assert sum("saved" in x.stdout for x in r) == 1  # said once, by rank 0
    r = launch(["record", "--teacher", str(tmp_path / "teacher")], 2, tmp_path / "rdzv2")
    assert all(x.returncode == 0 for x in r), [x.stderr for x in r]
    _, desc, _ = load_model(tmp_path / "teacher")
    one = json.loads((world.dir / "teacher.json").read_text())  # the same training in one process
    assert abs(desc["test_accuracy"] - one["test_accuracy"]) < 0.02, (desc["test_accuracy"], one["test_accuracy"])
    assert load(tmp_path / "teacher.stats.safetensors", desc["sha256"]).kinds == list(KINDS)  # the default: all four


def test_vit_recorded_and_distilled_under_two_ranks(colour_dir, tmp_path):
    """A ViT teacher from the user's code (examples/vit.py: nn.MultiheadAttention, LayerNorm, mean pooling) under
    two ranks as torchrun starts them: ``dfkd record`` (rank 0 records, the other waits) writes the very statistics
    one process writes, and its smaller-ViT student (hand-written attention) distilled data-parallel reaches one
    process's weights, every tensor moved from the seeded start."""
    from dfkd.checkpoint import save_model
    from dfkd.config import ReconstructConfig
    from dfkd.metadata import load
    from dfkd.models import build_model
    from dfkd.reconstruction import reconstruct_file
    from dfkd.sources import open_data
    from dfkd.specs import ModelRef
    code = str(Path(__file__).resolve().parents[1] / "examples" / "vit.py")
    info = open_data(f"folder:{colour_dir}", normalize="auto").info
    torch.manual_seed(0)
    net, info = build_model(f"{code}:teacher", info)
    for d in ("one", "two"):
        save_model(net.eval(), tmp_path / d / "teacher", f"{code}:teacher", {}, info)
    rec = ["record", "--code", code, "--data", f"folder:{colour_dir}", "--first-layer", "unit"]
    one = single(rec + ["--teacher", str(tmp_path / "one" / "teacher")])
    assert one.returncode == 0, one.stderr
    two = launch(rec + ["--teacher", str(tmp_path / "two" / "teacher")], 2, tmp_path / "rdzv")
    assert all(r.returncode == 0 for r in two), [r.stderr for r in two]
    s1 = load(tmp_path / "one" / "teacher.stats.safetensors")
    s2 = load(tmp_path / "two" / "teacher.stats.safetensors")
    assert s1.kinds == s2.kinds and "norm-stats" in s1.kinds
    t1, t2 = load_file(tmp_path / "one" / "teacher.stats.safetensors"), load_file(tmp_path / "two" / "teacher.stats.safetensors")
    assert t1.keys() == t2.keys() and any(".att" in k for k in t1)  # the attention blocks' outputs are recorded
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    reconstruct_file(ModelRef(str(tmp_path / "one" / "teacher"), code=(code,)),
                     str(tmp_path / "one" / "teacher.stats.safetensors"), tmp_path / "synthetic",
                     ReconstructConfig(objective="all-layers+norm-stats", n=16, batch_size=8, steps=2))
    lr = 1e-3
    dist = ["distill", "--synthetic", str(tmp_path / "synthetic"), "--student", f"{code}:student", "--epochs", "1",
            "--batch-size", "4", "--augment", "none", "--lr", str(lr), "--schedule", "constant", "--seed", "0",
            "--data", f"folder:{colour_dir}"]
    one = single(dist + ["--out", str(tmp_path / "s1")])
    assert one.returncode == 0, one.stderr
    two = launch(dist + ["--out", str(tmp_path / "s2")], 2, tmp_path / "rdzv2")
    assert all(r.returncode == 0 for r in two), [r.stderr for r in two]
    w1, w2 = load_file(tmp_path / "s1.safetensors"), load_file(tmp_path / "s2.safetensors")
    torch.manual_seed(0)  # the start, as distill_file makes it: the global RNG seeded with --seed, then the student
    w0 = build_model(f"{code}:student", info)[0].state_dict()
    assert w1.keys() == w2.keys() == w0.keys()
    for k in w0:  # 4 Adam steps of lr 1e-3 move each trained coordinate by about lr, at most ~4.04 lr
        for w in (w1, w2):
            assert lr / 2 < (w[k] - w0[k]).abs().max().item() < 5 * lr, k
    # the same 4 global steps, summed in another order (2 inputs a rank, then all-reduced): LayerNorm and the
    # softmax pass float32 rounding on, so a few coordinates differ (here 63 of 21,098 by over lr * 1e-4, 2 by over
    # lr * 1e-2, at most 0.02 lr); training each rank on its own rows, or without the all-reduce, moves nearly
    # every coordinate by ~lr (97% by over lr * 1e-2, measured)
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    # no tensor (a bias of 10 floats as well as a weight) may be left a step apart
    assert diff.max().item() < 0.1 * lr, [(k, (w1[k] - w2[k]).abs().max().item()) for k in w1]
    assert (diff > lr * 1e-2).float().mean().item() < 1e-3, (diff > lr * 1e-2).sum()
    assert (diff > lr * 1e-4).float().mean().item() < 2e-2, (diff > lr * 1e-4).sum()
