"""Fuzzing every loader with generated corruptions of a valid file: truncation, byte flips,
inserted and repeated bytes, huge declared sizes, and JSON values of the wrong type. The only
outcomes allowed are success and dfkd's own one-line ``DfkdError``; anything else (a
``KeyError`` from deep inside, a ``RecursionError``, an allocation of a declared size, a
warning printed beside the answer) fails.

CI runs 100 corruptions per loader; the slow suite 1,000 per loader with other seeds.
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd.checkpoint import load_model, load_weights
from dfkd.digits import from_hub_pickle, read_idx
from dfkd.errors import DfkdError
from dfkd.folders import folder_source
from dfkd.metadata import load as load_stats
from dfkd.models import build_model
from dfkd.npz import npz_source
from dfkd.resume import load_state, save_state
from dfkd.synthetic import SyntheticSet
from tests.conftest import write_idx

ODD = [None, -1, 0, 2 ** 40, 1.5, float("nan"), True, "x", "", [], {}, [[[[[[1]]]]]], ["a"], {"a": {}}]


def _json_paths(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _json_paths(v, path + (i,))


def mutate_json(obj, rng: random.Random):
    """``obj`` with one value (or key) replaced by an odd one, or deleted, or nested deep."""
    obj = json.loads(json.dumps(obj))
    paths = [p for p in _json_paths(obj) if p]
    if not paths:
        return rng.choice(ODD)
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    op = rng.random()
    if op < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.25:
        parent[path[-1]] = json.loads("[" * 200 + "]" * 200)
    else:
        parent[path[-1]] = rng.choice(ODD)
    return obj


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    op = rng.randrange(6)
    if op == 0:  # truncation
        return bytes(b[:rng.randrange(len(b))])
    if op == 1:  # byte flips
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 2:  # inserted junk
        i = rng.randrange(len(b))
        return bytes(b[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + b[i:])
    if op == 3:  # a huge declared size: a window of 0xff (or a big little/big-endian integer)
        i, n = rng.randrange(len(b)), rng.choice([2, 4, 8])
        b[i:i + n] = (b"\xff" * n) if rng.random() < 0.5 else (2 ** (8 * n - 2)).to_bytes(n, rng.choice(["little", "big"]))
        return bytes(b)
    if op == 4:  # a repeated stretch
        i = rng.randrange(len(b))
        return bytes(b[:i] + b[i:i + rng.randint(1, 256)] * 3 + b[i:])
    i = rng.randrange(min(len(b), 256))  # early bytes (headers) zeroed
    b[i:i + 8] = b"\0" * 8
    return bytes(b)


def mutate_safetensors(raw: bytes, rng: random.Random) -> bytes:
    """Half the time the bytes, half the time the JSON header (dtypes, shapes, offsets, metadata)."""
    if rng.random() < 0.5:
        return mutate_bytes(raw, rng)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.get("__metadata__", {})
    if "dfkd" in meta and rng.random() < 0.5:  # dfkd's own header inside
        meta["dfkd"] = json.dumps(mutate_json(json.loads(meta["dfkd"]), rng))
    else:
        header = mutate_json(header, rng)
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + raw[8 + n:]


# --- the loaders: each takes a folder holding its (possibly corrupted) file(s) ----------------------
def _stats(d: Path):
    load_stats(d / "t.stats.safetensors")


def _model(d: Path):
    load_model(d / "teacher")


def _synthetic(d: Path):
    stream = SyntheticSet(d / "syn").open().dataset()
    stream.batch(stream.epoch_order(torch.Generator().manual_seed(0))[:4])
    SyntheticSet(d / "syn").open().load()


def _idx(d: Path):
    read_idx(d / "x.idx")
    read_idx(d / "x.idx.gz")


def _folder(d: Path):
    src = folder_source(str(d / "imgs"))
    src.train.batch(torch.arange(len(src.train.labels)))


def _npz(d: Path):
    src = npz_source(str(d / "d.npz"))
    src.train.batch(torch.arange(len(src.train.labels)))


def _state_dict(d: Path):
    model, _ = build_model("hinton-800")
    load_weights(model, d / "sd.pt")


STATE_SETTINGS = {"verb": "train", "config": {"lr": 0.001}}


def _resume_state(d: Path):
    model, _ = build_model("hinton-800")
    load_state(d / "m.state.safetensors", model, torch.optim.Adam(model.parameters()), STATE_SETTINGS)


def _mnist_pickle(d: Path):
    from_hub_pickle((d / "mnist.pkl.gz").read_bytes(), d / "mnist.pkl.gz")


def _seed_files(world, d: Path) -> dict[str, tuple[callable, list[tuple[Path, callable]]]]:
    """Each loader with its valid file(s) under ``d`` and how to corrupt each."""
    import gzip
    import pickle
    from PIL import Image

    shutil.copy(world.stats, d / "t.stats.safetensors")
    for f in ("teacher.json", "teacher.safetensors"):
        shutil.copy(world.dir / f, d / f)
    shutil.copytree(world.synthetic, d / "syn")
    write_idx(d / "x.idx", np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4))
    write_idx(d / "x.idx.gz", np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4), compress=True)
    for c in ("a", "b"):
        (d / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 6), 50 * i + 3, np.uint8)).save(d / "imgs" / c / f"{i}.png")
    np.savez(d / "d.npz", x=np.arange(4 * 5 * 5, dtype=np.uint8).reshape(4, 5, 5), y=np.array([0, 1, 1, 0]))
    model, _ = build_model("hinton-800")
    torch.save(model.state_dict(), d / "sd.pt")
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 1, 28, 28)).sum().backward()
    opt.step()  # Adam's state tensors exist
    save_state(d / "m.state.safetensors", model, opt, 1, [{"loss": 1.0}], STATE_SETTINGS)
    arr = np.zeros((3, 784), np.float32)
    lab = np.array([0, 1, 2], np.int64)
    (d / "mnist.pkl.gz").write_bytes(gzip.compress(pickle.dumps(((arr, lab), (arr, lab), (arr, lab)), protocol=4)))

    def json_file(raw, rng):
        return json.dumps(mutate_json(json.loads(raw), rng)).encode() if rng.random() < 0.6 else mutate_bytes(raw, rng)

    def npz_member(raw, rng):  # the .npy inside, bytes or its header's shape text, the zip kept valid
        import io
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = {n: z.read(n) for n in z.namelist()}
        name = rng.choice(sorted(members))
        if rng.random() < 0.5:
            members[name] = members[name].replace(b"(4, 5, 5)", rng.choice([b"(4000000000000, 5, 5)", b"(4, 5)",
                                                                             b"(-1, 5, 5)", b"()"]))
        else:
            members[name] = mutate_bytes(members[name], rng)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
        return out.getvalue()

    shard = sorted((d / "syn").glob("shard-*.safetensors"))[0]
    return {
        "stats": (_stats, [(d / "t.stats.safetensors", mutate_safetensors)]),
        "model": (_model, [(d / "teacher.json", json_file), (d / "teacher.safetensors", mutate_safetensors)]),
        "synthetic": (_synthetic, [(d / "syn" / "manifest.json", json_file), (shard, mutate_safetensors)]),
        "idx": (_idx, [(d / "x.idx", mutate_bytes), (d / "x.idx.gz", mutate_bytes)]),
        "folder": (_folder, [(d / "imgs" / "a" / "0.png", mutate_bytes)]),
        "npz": (_npz, [(d / "d.npz", lambda raw, rng: npz_member(raw, rng) if rng.random() < 0.5
                        else mutate_bytes(raw, rng))]),
        "state-dict": (_state_dict, [(d / "sd.pt", mutate_bytes)]),
        "resume-state": (_resume_state, [(d / "m.state.safetensors", mutate_safetensors)]),
        "mnist-pickle": (_mnist_pickle, [(d / "mnist.pkl.gz", lambda raw, rng: mutate_bytes(raw, rng)
                                          if rng.random() < 0.5 else __import__("gzip").compress(
                                              mutate_bytes(__import__("gzip").decompress(raw), rng)))]),
    }


LOADERS = ["stats", "model", "synthetic", "idx", "folder", "npz", "state-dict", "resume-state", "mnist-pickle"]


def fuzz(world, tmp: Path, loader: str, n: int, seed: int) -> Counter:
    load, files = _seed_files(world, tmp)[loader]
    load(tmp)  # the uncorrupted file loads
    originals = {p: p.read_bytes() for p, _ in files}
    rng = random.Random(f"{loader}:{seed}")
    tally: Counter = Counter()
    for i in range(n):
        path, corrupt = files[rng.randrange(len(files))]
        path.write_bytes(corrupt(originals[path], rng))
        try:
            with warnings.catch_warnings():  # a warning printed beside the one-line answer is a finding too
                warnings.simplefilter("error")
                load(tmp)
            tally["loaded"] += 1
        except DfkdError:
            tally["refused"] += 1
        except Exception as e:  # anything else is a finding: say which corruption made it
            raise AssertionError(f"{loader} case {i} ({path.name}): {type(e).__name__}: {e}") from e
        finally:
            path.write_bytes(originals[path])
    return tally


@pytest.mark.parametrize("loader", LOADERS)
def test_fuzz_ci(world, tmp_path, loader):
    tally = fuzz(world, tmp_path, loader, 100, seed=0)
    assert sum(tally.values()) == 100 and tally["refused"] >= 30, tally


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_fuzz_slow(world, tmp_path, loader):
    tally = fuzz(world, tmp_path, loader, 1000, seed=1)
    assert sum(tally.values()) == 1000 and tally["refused"] >= 300, tally
