"""A shared blob that went bad while this user's local tier holds a verified copy.

A hit served from the per-user local tier never read the shared blob, so a blob corrupted on
the shared root (a disk error, a stray write, a hostile teammate) stayed corrupt for everyone
else while this user never noticed. Now each local hit stats the shared copy: when its stat
(size, mtime, inode) is the one recorded when this user last verified those bytes, nothing is
read; otherwise the shared bytes are read and verified, and a copy that is missing or does not
match its digest is reported once and rewritten, atomically, from the verified local bytes
(content-addressed, so rewriting it cannot change what any ref means). A change that keeps
size, mtime and inode (bit rot under the filesystem) is left to ``graphpatch-cache verify``.

A remote root (object storage) is left alone here: a hit served locally reads its ref only
(one small GET), never the remote blob, which every download verifies and ``verify`` checks.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:  # store.py imports this module
    from .store import CacheStore


def _stat(store: CacheStore, digest: str) -> Optional[Tuple[int, ...]]:
    return store.backend.stat(store._blob_name(digest))


def remember(store: CacheStore, digest: str) -> None:
    """Record the shared blob's stat: its bytes were just verified (read or written)."""
    if store.backend.remote:
        return
    st = _stat(store, digest)
    if store.local is not None and st is not None:
        store.local.remember_shared(str(store.root), digest, st)


def check_shared_copy(store: CacheStore, digest: str, data: bytes) -> None:
    """``data`` (verified local bytes of ``digest``) is being served: make sure the shared copy
    is intact too, repairing it from ``data`` when it is not (see the module doc)."""
    local = store.local
    if local is None or store.backend.remote:
        return
    st = _stat(store, digest)
    if st is not None and local.shared_stat(str(store.root), digest) == st:
        return
    blob = store._blob_path(digest)
    if st is not None:
        try:
            intact = hashlib.sha256(store.backend.read(store._blob_name(digest))).hexdigest() == digest
        except OSError:
            intact = False
        if intact:
            local.remember_shared(str(store.root), digest, st)
            return
    why = "missing" if st is None else "corrupt (its bytes do not match their sha256)"
    try:
        store.backend.write(store._blob_name(digest), data)
    except OSError as exc:
        _warn_once(store, blob, f"the shared copy of blob {digest[:12]} is {why}: {blob}; it could not be "
                                f"repaired from your verified local copy ({exc.strerror or exc}). Others "
                                "reading this root rebuild it; `graphpatch-cache verify` reports it")
        return
    remember(store, digest)
    _warn_once(store, blob, f"the shared copy of blob {digest[:12]} was {why}: {blob}; repaired from your "
                            "verified local copy")


def _warn_once(store: CacheStore, blob: object, message: str) -> None:
    if str(blob) not in store._warned:
        store._warned.add(str(blob))
        warnings.warn(f"graphpatch_cache: {message}", stacklevel=4)


__all__ = ["check_shared_copy", "remember"]
