"""Advisory per-key file locks: they only avoid duplicate extractions, correctness never
depends on them (some network filesystems only pretend to lock)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import filelock


@contextlib.contextmanager
def advisory_lock(path: Path, *, timeout: float, group_writable: bool) -> Iterator[bool]:
    """Hold the lock file ``path`` (yields whether it was acquired): on timeout or an
    unlockable filesystem the caller just proceeds.

    An OS lock dies with its process, so a killed extraction leaves no stale lock; where
    locks are fake or never granted, the timeout lets the caller proceed. In a shared
    (setgid) root the file is group-writable, so teammates can take the lock too.
    """
    try:
        lock = filelock.FileLock(str(path), timeout=timeout, mode=0o664 if group_writable else -1)
        lock.acquire()
    except (filelock.Timeout, OSError):
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            lock.release()


__all__ = ["advisory_lock"]
