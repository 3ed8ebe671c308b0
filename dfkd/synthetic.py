"""The synthetic set: a folder of shards and the manifest that lists them.

``shard-<b>.safetensors`` holds batch ``b``'s inputs (``x``, raw: in the data's units and range; the
teacher sees them through its normalisation),
intended labels and teacher logits, and in its header its record (losses, agreement) and a sha256
of tensors and record (``resume.content_sha256``), verified whenever a shard is read (a resume
verifies the shards it finds); ``manifest.json`` holds the settings that made the set (a resumed
run must match, or with ``restart`` starts the set over), the data description, the format (``FORMAT``:
sets of format 1, before 2, held normalised inputs and are refused in one line), and the finished
shards with their sha256. Every file is written atomically, so a shard that
exists is whole: an interrupted run, or any rank of a sharded one, resumes at its first
missing shard, and the set is complete when every shard exists (``finish``). ``SyntheticSet`` writes it (for
``reconstruct``) and reads it whole (``load``) or streams it (``dataset``) for ``distill``.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .data import DataInfo
from .distributed import Ranks
from .errors import DfkdError
from .files import load_tensors, read_json, write_json
from .resume import CHECKED, canonical, refusal, save_checked, verify

_SHARD = re.compile(r"shard-(\d+)\.safetensors")
WINDOW_BYTES = 512 * 2 ** 20  # shards shuffled together while streaming (all of them when the set is smaller)
REMAKE = "delete it to make it again, or rerun with --restart"  # a damaged shard found by a resume
REREAD = "delete it, then run the same dfkd reconstruct again to remake it"  # ... found by a reader
FORMAT = 2  # 2: x in raw data units; 1 (no "format" field): x in the teacher's normalised input units


def _rows(path: Path) -> int | None:
    """The row count of a shard's ``x`` from its header alone (None if it has no ``x``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("x").get_shape()[0] if "x" in f.keys() else None
    except FileNotFoundError:
        raise DfkdError(path, "no such file (listed in the manifest)") from None
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise DfkdError(path, f"not a valid safetensors file (truncated or corrupt: {e})") from None


class SyntheticSet:
    def __init__(self, path: str | Path):
        path = Path(path)
        self.dir = path.parent if path.name == "manifest.json" else path
        self.manifest_path = self.dir / "manifest.json"
        self.manifest: dict | None = None
        self.ranks = Ranks()

    # writing ---------------------------------------------------------------------------------
    def begin(self, key: dict, ranks: Ranks = Ranks(), restart: bool = False, **fields) -> set[int]:
        """Start a set made with ``key`` (settings, teacher, statistics) or resume one; the indices
        done, each of this rank's shards verified against its sha256. Every rank may call it: the
        first manifest's content is the same whoever writes it. A set made with other settings, or
        a damaged shard, is refused; with ``restart`` the set is started over (one process only)
        or the shard made again."""
        m, key = None, dict(key, format=FORMAT)  # a set of another format: like one of other settings
        if self.manifest_path.is_file():
            try:
                m = self._read()
            except DfkdError as e:  # unreadable: like a set of other settings, started over with restart
                if not restart or ranks.world > 1:
                    raise DfkdError(e.where, f"{e.problem}; delete the set's folder to make it again, or rerun "
                                    "with --restart (one process) to start it over") from None
                self._clear()
        if m is not None and not restart:
            self._check_format(m, "use another output folder, or rerun with --restart to make it again")
        old = {k: m.get(k) for k in key} if m is not None else None
        if m is not None and old != canonical(key):
            if not restart:
                raise refusal(self.dir, "holds a synthetic set made with", {k: m[k] for k in key if k in m}, key,
                              "use another output folder, "
                              "give the settings it was made with, or rerun with --restart to start it over")
            if ranks.world > 1:
                raise DfkdError("restart", "ranks cannot start one set over together; delete the set's files once, "
                                "then start every rank")
            self._clear()
            m = None
        if m is None:
            m = dict(key, **fields, shards=[], complete=False)
            write_json(self.manifest_path, m)
        files = {int(hit.group(1)): p for p in self.dir.glob("shard-*.safetensors")
                 if (hit := _SHARD.fullmatch(p.name))}
        listed = {s["index"]: s.get("sha256") for s in m["shards"]}
        for b, p in sorted(files.items()):
            if ranks.mine(b):  # each rank verifies its own shards
                try:
                    self._verified(p, listed.get(b), REMAKE)
                except DfkdError:
                    if not restart:
                        raise
                    p.unlink(missing_ok=True)
                    del files[b]
        done = set(files)
        m["shards"] = [s for s in m["shards"] if s["index"] in done]
        self.manifest, self.ranks = m, ranks
        self._timings_path = self.dir / f"timings-rank{ranks.rank}-of{ranks.world}.json"
        self._timings = read_json(self._timings_path) if ranks.world > 1 and self._timings_path.is_file() else {}
        return done

    def add(self, index: int, tensors: dict[str, torch.Tensor], seconds: float, **record) -> None:
        """Write shard ``index`` with its record (e.g. losses) in its own header, so that the file is
        the same bytes however the work was split; its time goes to the manifest (one process) or
        to this rank's ``timings-rank<r>-of<w>.json`` (ranks leave the manifest to ``finish``)."""
        fname = f"shard-{index:05d}.safetensors"
        sha = save_checked(self.dir / fname, tensors, json.dumps(record, sort_keys=True))
        if self.ranks.world == 1:
            self.manifest["shards"].append(dict(record, index=index, file=fname, n=len(tensors["x"]), seconds=seconds,
                                                sha256=sha))
            self.manifest["shards"].sort(key=lambda s: s["index"])
            write_json(self.manifest_path, self.manifest)
        else:
            self._timings[str(index)] = seconds
            write_json(self._timings_path, self._timings)

    def finish(self, n_shards: int, **fields) -> bool:
        """Mark the set complete once all ``n_shards`` shards exist, listing them from their headers:
        rank 0 between two barriers under a process group (so that every rank then reads the
        complete manifest), else whichever rank finds the set whole. Whether this process did."""
        self.ranks.barrier()
        done = (not self.ranks.group or self.ranks.main) and self._complete(n_shards, fields)
        self.ranks.barrier()
        return done

    def _complete(self, n_shards: int, fields: dict) -> bool:
        files = [self.dir / f"shard-{b:05d}.safetensors" for b in range(n_shards)]
        if not all(f.is_file() for f in files):
            return False  # other ranks are still at work
        seconds = {s["index"]: s.get("seconds", 0.0) for s in self.manifest["shards"]}
        for t in self.dir.glob("timings-rank*.json"):
            seconds.update({int(k): float(v) for k, v in read_json(t).items()})
        shards = []
        for b, f in enumerate(files):
            try:  # verified by the rank that made or resumed it; only its header is read here
                with safe_open(str(f), framework="pt") as h:
                    entry = json.loads((h.metadata() or {})[CHECKED])
                    shards.append(dict(json.loads(entry["body"]), index=b, file=f.name,
                                       n=h.get_slice("x").get_shape()[0], seconds=seconds.get(b, 0.0),
                                       sha256=entry["sha256"]))
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise DfkdError(f, f"damaged ({type(e).__name__}); {REMAKE}") from None
        whole = dict(self.manifest, **fields, shards=shards, complete=True)
        if whole != self.manifest:  # a set found complete as it was left (a rerun, a kill after this write): no write
            self.manifest = whole
            write_json(self.manifest_path, whole)
        return True

    # reading ---------------------------------------------------------------------------------
    def _read(self) -> dict:
        m = read_json(self.manifest_path)
        shards = m.get("shards")
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("index"), int) and isinstance(s.get("file"), str)
                and isinstance(s.get("n"), int) and s["n"] > 0 and "/" not in s["file"] and "\\" not in s["file"]
                for s in shards):
            raise DfkdError(self.manifest_path, "its shards list is missing or malformed")
        return m

    def open(self) -> "SyntheticSet":
        """Read a complete set's manifest (the one-line errors name the file)."""
        if not self.manifest_path.is_file():
            raise DfkdError(self.manifest_path, "no such file (not a synthetic set folder)")
        self.manifest = self._read()
        self._check_format(self.manifest, "make it again with dfkd reconstruct --restart")
        if not self.manifest.get("complete"):
            raise DfkdError(self.manifest_path, "the synthetic set is incomplete; run dfkd reconstruct again to finish it")
        if not self.manifest["shards"]:
            raise DfkdError(self.manifest_path, "lists no shards")
        for s in self.manifest["shards"]:  # declared sizes checked against the files before anything is allocated
            if _rows(self.dir / s["file"]) != s["n"]:
                raise DfkdError(self.dir / s["file"], f"does not hold the {s['n']} inputs the manifest lists")
        return self

    def _check_format(self, m: dict, remedy: str) -> None:
        f = m.get("format", 1)
        if f != FORMAT:
            older = isinstance(f, int) and f < FORMAT
            raise DfkdError(self.manifest_path, f"a synthetic set of format {f}" + (" (normalised inputs)" if f == 1 else "")
                            + f"; this dfkd reads format {FORMAT} (raw inputs): "
                            + (remedy if older else "read it with the newer dfkd that made it"))

    @property
    def info(self) -> DataInfo:
        return DataInfo.from_dict(self.manifest.get("data"), self.manifest_path)

    def __len__(self) -> int:
        return sum(s["n"] for s in self.manifest["shards"])

    def shard(self, k: int) -> dict[str, torch.Tensor]:
        """Shard ``k`` of the manifest, its content checked and its sha256 verified."""
        s = self.manifest["shards"][k]
        return self._verified(self.dir / s["file"], s.get("sha256"), REREAD, s["n"])

    def _verified(self, path: Path, listed: str | None, remedy: str, n: int | None = None) -> dict[str, torch.Tensor]:
        """A shard's tensors once they hold what a shard holds (``n`` rows), finite, and match the
        sha256 in its header and the one the manifest lists (if it does)."""
        try:
            t, meta = load_tensors(path)
        except DfkdError as e:
            raise DfkdError(e.where, f"damaged ({e.problem}); {remedy}") from None
        if set(t) != {"x", "label", "logits"} or any(len(v) != (n or len(t["x"])) for v in t.values()):
            raise DfkdError(path, "does not hold the x, label and logits the manifest lists")
        if not (torch.isfinite(t["x"]).all() and torch.isfinite(t["logits"]).all()):
            raise DfkdError(path, "holds NaN or infinite values")
        _, sha = verify(path, t, meta, remedy)
        if listed is not None and listed != sha:
            raise DfkdError(path, f"is not the shard {self.manifest_path.name} lists (sha256 differs); {remedy}")
        return t

    def fingerprint(self) -> str:
        """sha256 of what the set is: the settings that made it and its shards' sha256."""
        m = self.manifest
        what = {k: m.get(k) for k in ("config", "teacher_sha256", "stats_sha256", "objective", "data", "format")}
        what["shards"] = [s.get("sha256") for s in m["shards"]]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def _clear(self) -> None:
        """Delete the set's own files, the manifest last (so a set killed half-cleared is still refused)."""
        for p in [*self.dir.glob("shard-*.safetensors"), *self.dir.glob("timings-rank*.json"), self.dir / "samples.png",
                  self.manifest_path]:
            p.unlink(missing_ok=True)

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All shards: inputs, intended labels, teacher logits."""
        parts = [self.shard(k) for k in range(len(self.manifest["shards"]))]
        try:
            return tuple(torch.cat([p[k] for p in parts]) for k in ("x", "label", "logits"))
        except RuntimeError as e:
            raise DfkdError(self.manifest_path, f"shards are inconsistent ({str(e).splitlines()[0]})") from None

    def dataset(self) -> "ShardStream":
        return ShardStream(self)


class ShardStream(torch.utils.data.Dataset):
    """The set as a dataset of ``(input, teacher logits)`` that holds only the shards in use. Each
    epoch's order (``epoch_order``) shuffles the shards, then the samples within windows of
    shards that fit in ``WINDOW_BYTES`` (the whole set at once when it is that small)."""

    def __init__(self, s: SyntheticSet):
        self.set = s
        sizes = [sh["n"] for sh in s.manifest["shards"]]
        self.starts = torch.tensor([0] + sizes).cumsum(0)
        per = max(1, int(torch.tensor(s.info.shape).prod()) * 4 + 256)
        self.window = max(1, WINDOW_BYTES // (per * max(sizes or [1])))
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def info(self) -> DataInfo:
        """The set's data description: the stream passed alone is normalised as the set is."""
        return self.set.info

    def __len__(self) -> int:
        return int(self.starts[-1])

    def epoch_order(self, g: torch.Generator) -> torch.Tensor:
        shards = torch.randperm(len(self.starts) - 1, generator=g)
        out = []
        for w in range(0, len(shards), self.window):
            idx = torch.cat([torch.arange(int(self.starts[k]), int(self.starts[k + 1])) for k in shards[w:w + self.window]])
            out.append(idx[torch.randperm(len(idx), generator=g)])
        return torch.cat(out)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        need = set(shard.unique().tolist())
        for k in [k for k in self._cache if k not in need] if len(need) + len(self._cache) > self.window else []:
            del self._cache[k]
        for k in need - set(self._cache):
            self._cache[k] = self.set.shard(k)
        x = torch.empty((len(idx), *self._cache[next(iter(need))]["x"].shape[1:]))
        logits = torch.empty((len(idx), self._cache[next(iter(need))]["logits"].shape[1]))
        for k in need:
            sel = shard == k
            local = idx[sel] - self.starts[k]
            x[sel], logits[sel] = self._cache[k]["x"][local], self._cache[k]["logits"][local]
        return x, logits
