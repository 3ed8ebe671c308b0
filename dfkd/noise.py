"""The noise of private records (``privacy``): standard normal draws from the operating system's
entropy, ``os.urandom``, never from a seed. A seed, the public code and a file's header would
regenerate every draw and so recover the exact statistics; torch's CPU generator would also keep
only 32 bits of any seed given to it (seeds ``s`` and ``s + 2**32`` draw the same numbers).

Two 53-bit uniforms make two normals (Box-Muller, float64); ``|z|`` stays below 8.58, which cuts a
tail of mass below 1e-17 per draw. Tests alone set ``INSECURE_TEST_NOISE_SEED`` for reproducible
draws (``random.Random``, not a secure generator); every file made so says it is NOT private.
"""
from __future__ import annotations

import math
import os
import random

import numpy as np
import torch

INSECURE_TEST_NOISE_SEED: int | None = None  # TESTS ONLY: reproducible noise, and files that are NOT private
NOISE_SECURE = "operating-system randomness (os.urandom); not stored, not reproducible"
NOISE_INSECURE = ("INSECURE test noise (dfkd.noise.INSECURE_TEST_NOISE_SEED was set): reproducible from a seed, "
                  "so this file is NOT private")


class NoiseSource:
    """Standard normal draws from ``os.urandom``, or from ``random.Random(INSECURE_TEST_NOISE_SEED)``
    where a test set it (read when the source is made)."""

    def __init__(self):
        self.insecure = INSECURE_TEST_NOISE_SEED is not None
        self._bytes = random.Random(INSECURE_TEST_NOISE_SEED).randbytes if self.insecure else os.urandom

    def normal(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        k = math.prod(shape)
        if k == 0:
            return torch.zeros(shape, dtype=torch.float64)
        m = (k + 1) // 2
        words = np.frombuffer(self._bytes(16 * m), dtype="<u8").reshape(2, m)  # little-endian 64-bit words
        u = (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # uniforms on [0, 1), 53 random bits each
        r = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]
        z = np.concatenate([r * np.cos(2 * math.pi * u[1]), r * np.sin(2 * math.pi * u[1])])[:k]
        return torch.from_numpy(z.reshape(tuple(shape)))  # numpy: these small element-wise ops stay on one thread
