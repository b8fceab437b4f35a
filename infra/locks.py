"""Advisory file locks: one writer per storage root (a retraining, a `make serve` stack)."""

from __future__ import annotations

import fcntl
from pathlib import Path


def try_lock(path: Path):
    """An open file holding an exclusive lock on ``path`` (released when closed); None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
