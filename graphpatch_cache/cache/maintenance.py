"""Keeping a store healthy: ``check`` (the loader's checks and the key proof, for every
ref), ``remove``, ``gc``. :class:`~graphpatch_cache.cache.store.CacheStore`'s methods of
the same names call these; a bad entry goes to the store's one quarantine."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set, Tuple, Union

from ..errors import CacheError, CacheMissError
from .records import CacheEntry, CheckReport, GcReport, Problem
from .settings import parse_duration, parse_size

if TYPE_CHECKING:  # store.py imports this module; the store's type only annotates here
    from ..artifact import GraphArtifact
    from .store import CacheStore

#: ``fn(artifact)`` raising on failure: a further check of each intact artifact
ArtifactCheck = Callable[["GraphArtifact"], Any]

#: temp files of writes abandoned this long ago (killed processes) are removed by ``gc``
STALE_TMP_SECONDS = 86400


def check(store: CacheStore, keys: Optional[List[str]] = None, *, fix: bool = False,
          rebuild_check: Optional[ArtifactCheck] = None) -> CheckReport:
    """Check every ref (of ``keys``, or of the whole store) the way the loader would:
    the ref parses, its blob is present with the right digest, the artifact passes
    :func:`~graphpatch_cache.trust.validate.read_artifact` (schema, allowlist, argument and
    structure rules), and the entry proves it belongs to its key
    (:func:`~graphpatch_cache.cache.proof.entry_disagreement`).

    Without ``fix`` nothing on disk changes. With ``fix`` each bad ref is quarantined,
    and so is its blob where the blob itself is bad (corrupt, or not a loadable artifact);
    an intact blob that is merely under the wrong key stays (another key may name it).

    :param rebuild_check: ``fn(artifact)`` raising on failure, for extra checks (e.g.
        :func:`~graphpatch_cache.cache.inspect.check_node_tree`).
    """
    report = CheckReport(fixed=fix)
    for key in store.keys() if keys is None else keys:
        entries, bad = store._scan(store._check_key(key))
        report.checked += len(entries) + len(bad)
        for name, why in bad:
            file = name.rsplit("/", 1)[-1]
            report.problems.append(Problem(path=store.location(name), key=key, message=why,
                                           variant=file[: -len(".json")], kind="malformed-ref"))
            if fix:
                store.quarantine(name, label=f"{key}.{file}")
        for entry in entries:
            problem, blob_too = check_entry(store, entry, rebuild_check)
            if problem is None:
                continue
            report.problems.append(problem)
            if fix:
                if blob_too:
                    store.quarantine(store._blob_name(entry.digest))
                store.quarantine(store._ref_name(entry.key, entry.variant), label=f"{entry.key}.{entry.variant}.json")
    return report


def check_entry(store: CacheStore, entry: CacheEntry,
                rebuild_check: Optional[ArtifactCheck] = None) -> Tuple[Optional[Problem], bool]:
    """(the entry's problem or None, whether its blob is bad too). Changes nothing."""
    blob = store._blob_path(entry.digest)

    def problem(kind: str, message: str, path: str = blob) -> Problem:
        return Problem(path=path, key=entry.key, message=message, variant=entry.variant, kind=kind)

    from ..trust.validate import read_artifact  # deferred: imports torch (rm and gc do not)
    from .proof import entry_disagreement  # deferred: imports torch

    data, why = store._read_shared(entry.digest)
    if data is None:
        if why == "missing":
            return problem("missing-blob", "blob missing"), False
        if why == "corrupt":
            return problem("corrupt-blob", "digest mismatch: the blob is damaged"), True
        return problem("missing-blob", f"blob {why}"), False
    try:
        artifact = read_artifact(data, blob)
        if rebuild_check is not None:
            rebuild_check(artifact)
    except Exception as exc:  # any refusal is a problem to report, never a crash of verify
        return problem("invalid-artifact", f"invalid artifact: {exc}"), True
    disagreement = entry_disagreement(entry.key, entry.variant, entry.ref(), artifact)
    if disagreement is not None:
        kind = "unproven" if entry.material is None else "wrong-key"
        return problem(kind, f"does not belong to its key: {disagreement}", entry.ref_path), False
    return None, False


def remove(store: CacheStore, key: str) -> int:
    """Remove every variant of ``key`` (blobs other keys share are kept). Returns the
    number of variants removed.

    :raises CacheMissError: no such key.
    """
    store._check_key(key)
    entries = store.variants(key)
    folder = f"refs/{key}"
    if not store.backend.exists(folder):
        raise CacheMissError(f"no cache entry with key {key[:12]}", path=store.location(folder))
    for i, file in enumerate(store.backend.list(folder)):
        try:
            store.backend.delete(f"{folder}/{file}")
        except FileNotFoundError:
            pass  # removed meanwhile
        except OSError as exc:
            raise _cannot_remove(store, f"{key[:12]}: {i} of its files removed", exc) from exc
    store.backend.remove_folder(folder)
    drop_unreferenced(store, {e.digest for e in entries})
    return len(entries)


def _cannot_remove(store: CacheStore, what: str, exc: OSError) -> CacheError:
    return CacheError(f"cannot remove from the cache at {store.root} ({what}): {exc.strerror or exc}",
                      path=str(getattr(exc, "filename", None) or store.root),
                      hint="the cache root is read-only for this user (a read-only mount, or no write "
                           "permission): run this as a user who may write there, or point --cache-dir "
                           "(GRAPHPATCH_CACHE_DIR) at a root of your own")


def drop_unreferenced(store: CacheStore, digests: Set[str]) -> int:
    """Delete the blobs of ``digests`` that no ref names any more; the bytes freed."""
    live = {e.digest for e in store.entries()}
    freed = 0
    for digest in digests - live:
        with contextlib.suppress(OSError):
            size = store.backend.size(store._blob_name(digest))
            store.backend.delete(store._blob_name(digest))
            freed += size
    return freed


def doomed_entries(entries: List[CacheEntry], now: float, older_than: Union[str, float, None],
                   max_bytes: Union[str, int, None]) -> List[CacheEntry]:
    """The entries (sorted oldest first) that ``gc`` removes: older than ``older_than``,
    then the oldest until the rest hold at most ``max_bytes``."""
    doomed: List[CacheEntry] = []
    if older_than is not None:
        limit = parse_duration(older_than)
        doomed += [e for e in entries if now - e.created > limit]
    if max_bytes is not None:
        budget = parse_size(max_bytes)
        kept = [e for e in entries if e not in doomed]
        total = sum(e.size for e in kept)
        for e in kept:
            if total <= budget:
                break
            doomed.append(e)
            total -= e.size
    return doomed


def gc(store: CacheStore, *, older_than: Union[str, float, None] = None, max_bytes: Union[str, int, None] = None,
       dry_run: bool = False, progress: Optional[Callable[[int, int], Any]] = None) -> GcReport:
    """Remove variants created more than ``older_than`` ago, then the oldest until the
    store holds at most ``max_bytes``; also stale temp files and unreferenced blobs.

    :param progress: optional ``fn(done, total)`` called as entries are examined.
    """
    report = GcReport(dry_run=dry_run)
    now = time.time()
    entries = sorted(store.entries(), key=lambda e: e.created)
    doomed = doomed_entries(entries, now, older_than, max_bytes)
    for i, entry in enumerate(doomed):
        if not dry_run:
            try:
                store.backend.delete(store._ref_name(entry.key, entry.variant))
            except FileNotFoundError:
                pass  # removed meanwhile by another gc or rm: gone either way
            except OSError as exc:
                drop_unreferenced(store, {e.digest for e in doomed[:i]})
                raise _cannot_remove(store, f"{i} of {len(doomed)} entries removed", exc) from exc
            store.backend.remove_folder(f"refs/{entry.key}")
        report.removed.append(f"{entry.key}/{entry.variant}")
        report.freed_bytes += entry.size
        if progress is not None:
            progress(i + 1, len(doomed))
    if dry_run:
        report.kept_bytes = sum(e.size for e in entries if e not in doomed)
        return report
    drop_unreferenced(store, {e.digest for e in doomed})
    store.backend.clean_tmp(STALE_TMP_SECONDS)
    report.kept_bytes = sum(e.size for e in store.entries())
    return report


__all__ = ["ArtifactCheck", "STALE_TMP_SECONDS", "check", "check_entry", "doomed_entries", "drop_unreferenced",
           "gc", "remove"]
