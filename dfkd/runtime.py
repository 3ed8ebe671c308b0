"""Seeding, threads and device choice: the only miscellaneous module, kept tiny."""
from __future__ import annotations

import os

import torch

from .distributed import local_device
from .errors import DfkdError


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG and return a CPU generator seeded the same way."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def setup_threads() -> None:
    """Use every core unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def whole(rt, verb: str) -> None:
    """Refuse a share (``rank``, ``world_size``) for a stage that does not split its work by it (only
    reconstruct does; the others scale out under torchrun)."""
    if rt.rank is not None or rt.world_size is not None:
        raise DfkdError("rank", f"{verb} does not split its work by rank and world size (only reconstruct "
                        "does); run it under torchrun to share it")


def bars_off(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` setting: off when asked, else shown only on a terminal."""
    return None if progress else True


def pick_device(name: str = "cpu") -> torch.device:
    """Resolve ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; refuse what is not here: a device torch
    knows but this machine lacks (``mps`` off Apple silicon, ``cuda`` without CUDA, ``cuda:3`` on a
    machine with two GPUs) is one line, before anything is moved to it."""
    if name == "auto":  # the rank's own GPU under torchrun, else any GPU, else the CPU
        return torch.device(local_device(name))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DfkdError("device", f"unknown device {name!r} (use cpu, cuda or auto)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DfkdError("device", "cuda was asked for but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DfkdError("device", f"{name} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    if not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        raise DfkdError("device", f"{name} was asked for but this machine has no {dev.type} device (use cpu, cuda "
                        "or auto)")
    return dev
