"""Fault injection for the crash tests, off unless the environment asks for it.

``DFKD_TEST_CRASH_AT=K`` makes this process kill itself with ``SIGKILL`` during its K-th atomic
write, after the temp file is written and before it is renamed over the target (the moment a
killed run leaves a temp file behind); ``K+`` kills it right after the K-th rename instead;
``K@PATTERN`` (or ``K+@PATTERN``) counts only the writes whose file name matches the shell
pattern (``2@shard-*``: the second shard). ``DFKD_TEST_WRITE_LOG=FILE`` appends every target this
process writes atomically to ``FILE``, one path a line. Together they let a test kill a run at
exactly the point it chooses, on any machine however loaded, instead of at a moment drawn from a
clock. Neither changes what is written; with neither set, ``point`` only counts.
"""
from __future__ import annotations

import fnmatch
import os
import signal
from pathlib import Path

_writes = 0


def point(path: Path, replaced: bool) -> None:
    """Called by ``atomic_write`` before (``replaced=False``) and after the rename of ``path``."""
    global _writes
    at, _, pattern = os.environ.get("DFKD_TEST_CRASH_AT", "").partition("@")
    counted = not pattern or fnmatch.fnmatch(path.name, pattern)
    if not replaced and counted:
        _writes += 1
    elif replaced and (log := os.environ.get("DFKD_TEST_WRITE_LOG")):
        with open(log, "a") as f:
            f.write(f"{path}\n")
    if at and counted and at == f"{_writes}{'+' if replaced else ''}":
        os.kill(os.getpid(), signal.SIGKILL)
