"""What is on disk under a cache root, and a store with a chosen local tier: the oracles of the
cache-store tests (``tests/unit/test_cache_store.py``, ``tests/integration/test_cache_store*.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import torch

from graphpatch_cache.cache import CacheStore

__all__ = ["corrupt", "sha256_file", "blobs", "refs", "files_under", "logits", "cache_warnings", "store",
           "read_only"]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blobs(root: Path) -> list:
    objects = Path(root) / "objects"
    return sorted(p for p in objects.glob("*/*") if p.is_file()) if objects.is_dir() else []


def refs(root: Path) -> list:
    folder = Path(root) / "refs"
    return sorted(folder.glob("*/*.json")) if folder.is_dir() else []


def files_under(path: Path) -> list:
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs).logits


def cache_warnings(record) -> list:
    return [w for w in record if "graphpatch_cache" in str(w.message)]


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """Around a block that drives a child process: kill and reap it on the way out if it still
    runs (a failed assertion leaves no orphan behind)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def store(root: Path, local=None, **kw) -> CacheStore:
    """A store whose local tier is ``local`` (a path), or disabled (``False``)."""
    return CacheStore(root, local_dir=local, **kw)


def corrupt(path: Path, how: str) -> bytes:
    """Damage a file in place: ``"flip"`` one bit in the middle, else cut it in half; returns
    the damaged bytes."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    return bytes(data)


def _writable(path: Path) -> bool:
    probe = Path(path) / ".write-probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


@contextlib.contextmanager
def read_only(root: Path):
    """``root`` read-only for this process, whoever it is: every directory under it chmod
    0555, and where modes do not stop this user (root), a read-only bind mount of it, which
    stops root too. Restored on exit. Skips (with the reason) only where neither works."""
    import pytest

    dirs = [Path(root), *(p for p in Path(root).rglob("*") if p.is_dir())]
    for d in dirs:
        os.chmod(d, 0o555)
    mounted = False
    try:
        if _writable(root):
            mount = subprocess.run(f"mount --bind {root} {root} && mount -o remount,bind,ro {root}", shell=True,
                                   capture_output=True, text=True)
            mounted = mount.returncode == 0
            if not mounted or _writable(root):
                pytest.skip(f"neither chmod nor a read-only bind mount stops this user from writing: {mount.stderr}")
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)
        for d in dirs:
            os.chmod(d, 0o755)
