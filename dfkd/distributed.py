"""Many processes: which share of the work is this process's, on PyTorch's own engine.

Under ``torchrun`` (its ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` environment), ``group``
starts one ``torch.distributed`` process group (gloo on CPU, NCCL on CUDA; the rendezvous from
``$DFKD_DIST_INIT`` when set, e.g. ``file:///shared/rdzv``, else torchrun's ``env://``).
Reconstruction splits its shards over the ranks (shard ``b`` is rank ``b % world``'s) and needs
no communication at all, so the same split also runs with no group (``--rank R --world-size W``:
a job array, or machines sharing a folder). Distillation is data-parallel
(``DistributedDataParallel``): each rank takes its slice of every global batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import DfkdError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    group: bool = False  # a torch.distributed process group is up (barriers and all-reduce work)

    @property
    def main(self) -> bool:
        """The process that writes what all share (manifests, checkpoints, results)."""
        return self.rank == 0

    @property
    def tag(self) -> str:
        """The name of this rank's share of an output (its lock), empty for a single process."""
        return f"-rank{self.rank}-of{self.world}" if self.world > 1 else ""

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.group:
            dist.barrier()


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        raise DfkdError(name, f"{v!r} is not an integer") from None


def current() -> Ranks:
    """The process group already up (started by ``group`` or by the user), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), True)
    return Ranks()


def group(device: str = "cpu") -> Ranks:
    """The process group of a torchrun job (started once), or a single process."""
    world = _env_int("WORLD_SIZE") or 1
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"
        try:
            dist.init_process_group(backend, init_method=os.environ.get("DFKD_DIST_INIT", "env://"),
                                    rank=_env_int("RANK"), world_size=world)
        except (RuntimeError, ValueError) as e:
            raise DfkdError("torchrun", f"cannot join the process group ({str(e).splitlines()[0]})") from None
    return Ranks(dist.get_rank(), dist.get_world_size(), True)


def ranks(rank: int | None = None, world_size: int | None = None, device: str = "cpu") -> Ranks:
    """This process's share: explicit (``--rank``/``--world-size``, no group), else torchrun's."""
    if rank is None and world_size is None:
        return group(device)
    if rank is None or world_size is None or world_size < 1 or not 0 <= rank < world_size:
        raise DfkdError("rank", f"give both, with 0 <= rank < world size (got rank {rank}, world size {world_size})")
    return Ranks(rank, world_size, False)


def local_device(name: str) -> str:
    """``auto``: the rank's own GPU under torchrun (``cuda:$LOCAL_RANK``), any GPU alone, else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{(_env_int('LOCAL_RANK') or 0) % torch.cuda.device_count()}"
    return name
