"""The per-user local tier: a diskcache in front of a (possibly shared, possibly slow) root.

Blobs are immutable and named by their digest, so the local copy of a blob can never be
stale: readers still verify its digest, and a bad local copy is simply dropped. The tier also
remembers which digests passed the loader's JSON Schema validation (under the schema and
allowlist they were validated with), the stat of each shared blob it last verified
(:mod:`.repair`), and the refs last read from a remote root (:mod:`.offline`). Deleting the
whole local directory is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

#: local blobs beyond this many bytes are evicted (least recently used first)
DEFAULT_SIZE_LIMIT = 2 * 1024**3


class LocalTier:
    """Memoized blob bytes by digest, in a diskcache at ``directory``."""

    def __init__(self, directory: Path, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        self.directory = Path(directory)
        self.size_limit = size_limit
        self._cache: Any = None

    def _open(self) -> Any:
        if self._cache is None:
            import diskcache  # deferred: the local tier opens (and imports diskcache) on first use

            self.directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(self.directory), size_limit=self.size_limit,
                                          eviction_policy="least-recently-used")
        return self._cache

    def get_blob(self, digest: str) -> Optional[bytes]:
        try:
            value = self._open().get(f"blob:{digest}")
        except Exception:  # a damaged or deleted local tier is just a miss
            self._reset()
            return None
        return value if isinstance(value, bytes) else None

    def put_blob(self, digest: str, data: bytes) -> None:
        try:
            self._open().set(f"blob:{digest}", data)
        except Exception:
            self._reset()

    # "validated" records (see graphpatch_cache.trust.digests): this tier is the user's own,
    # never on the shared root, so only this user's processes can have written them
    def validated(self, digest: str, tag: str) -> bool:
        """Whether bytes with sha256 ``digest`` passed validation under ``tag`` before."""
        try:
            return self._open().get(f"validated:{tag}:{digest}") is True
        except Exception:
            self._reset()
            return False

    def mark_validated(self, digest: str, tag: str) -> None:
        try:
            self._open().set(f"validated:{tag}:{digest}", True)
        except Exception:
            self._reset()

    # "shared" records: the stat of a shared root's blob when this user last verified its
    # bytes (see .repair): a hit served locally stats the shared copy, reading it only when
    # the stat moved
    def shared_stat(self, root: str, digest: str) -> Optional[Tuple[int, ...]]:
        try:
            value = self._open().get(f"shared:{root}:{digest}")
        except Exception:
            self._reset()
            return None
        return tuple(value) if isinstance(value, (list, tuple)) else None

    def remember_shared(self, root: str, digest: str, stat: Tuple[int, ...]) -> None:
        try:
            self._open().set(f"shared:{root}:{digest}", list(stat))
        except Exception:
            self._reset()

    # "refs" records: the refs last read from a remote root (name -> the ref's fields), so that a
    # hit still works when that root cannot be reached (see .offline)
    def remembered_refs(self, root: str, key: str) -> Optional[Dict[str, Any]]:
        try:
            value = self._open().get(f"refs:{root}:{key}")
        except Exception:
            self._reset()
            return None
        return value if isinstance(value, dict) else None

    def remember_refs(self, root: str, key: str, refs: Dict[str, Any]) -> None:
        try:
            cache = self._open()
            if cache.get(f"refs:{root}:{key}") != refs:  # a hit reads, and writes only what changed
                cache.set(f"refs:{root}:{key}", refs)
        except Exception:
            self._reset()

    def lock_path(self, root: str, key: str) -> Path:
        """A per-machine lock file for extracting ``key`` into a root that has no locks of its own
        (object storage): it only spares this user's processes duplicate extractions."""
        return self.directory / "locks" / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}-{key}.lock"

    def drop_blob(self, digest: str) -> None:
        with contextlib.suppress(Exception):
            self._open().delete(f"blob:{digest}")

    def _reset(self) -> None:
        with contextlib.suppress(Exception):
            if self._cache is not None:
                self._cache.close()
        self._cache = None

    def close(self) -> None:
        self._reset()


__all__ = ["LocalTier"]
