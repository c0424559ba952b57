"""CacheStore: content-addressed artifacts on a plain filesystem, safe to share.

Layout under the root::

    objects/ab/abcdef...   immutable blobs, named by the sha256 of their bytes
    refs/<key>/<sig>.json  small files naming a blob, one per graph variant of a key
    tmp/                   writes in progress (same filesystem, so renames are atomic)
    quarantine/            blobs and refs that failed verification
    locks/<key>.lock       advisory locks that only avoid duplicate extractions

Writes go to ``tmp/``, are fsynced and renamed into place; the blob is published before
the ref that names it. Readers verify every blob's digest: a corrupt or missing blob is a
miss (quarantined, warned about once), never a wrong graph. Correctness never depends on the
locks, because some network filesystems only pretend to lock.

A per-user local tier (:class:`~graphpatch_cache.cache.local.LocalTier`, diskcache) sits in
front of the shared root and memoizes blobs by digest; it never lives under the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from ..artifact import GraphArtifact
from ..validate import read_artifact
from ..errors import CacheError, CacheMissError
from ..signature import signature_key
from .local import LocalTier

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def default_root() -> Path:
    """``$GRAPHPATCH_CACHE_DIR``, else the platform's user cache dir."""
    env = os.environ.get("GRAPHPATCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("graphpatch-cache")) / "store"


def default_local_dir() -> Path:
    """``$GRAPHPATCH_CACHE_LOCAL_DIR``, else ``local`` in the platform's user cache dir."""
    env = os.environ.get("GRAPHPATCH_CACHE_LOCAL_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("graphpatch-cache")) / "local"


def parse_duration(value: Union[str, float, int]) -> float:
    """Seconds from ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30d, 12h, 90m, 2w)")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


def parse_size(value: Union[str, int]) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, ``1024`` ..."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 5GB, 500MB)")
    number, unit = float(match.group(1)), match.group(2).lower().rstrip("b").rstrip("i")
    return int(number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit])


@dataclass(frozen=True)
class CacheEntry:
    """One cached graph variant."""

    key: str
    variant: str
    digest: str
    model_class: str
    size: int
    created: float
    versions: Dict[str, str]
    signature: Dict[str, Any] = field(repr=False, default_factory=dict)
    ref_path: str = ""


@dataclass(frozen=True)
class Problem:
    """Something :meth:`CacheStore.verify` found wrong."""

    path: str
    key: str
    message: str


@dataclass
class GcReport:
    removed: List[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_bytes: int = 0
    dry_run: bool = False


class CacheStore:
    """A graph cache rooted at ``root`` (default: :func:`default_root`).

    :param local_dir: the per-user local tier (diskcache); ``None`` for the default,
        ``False`` to disable it. It must not be inside ``root``.
    :param locking: take a per-key file lock around extraction (only avoids duplicate work).
    :param lock_timeout: seconds to wait for another process's extraction before doing it too.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike, None] = None,
        *,
        local_dir: Union[str, os.PathLike, None, bool] = None,
        locking: bool = True,
        lock_timeout: float = 600.0,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.locking = locking
        self.lock_timeout = lock_timeout
        self._warned: set[str] = set()
        self.local: Optional[LocalTier] = None
        if local_dir is not False:
            local_path = Path(local_dir).expanduser() if local_dir not in (None, True) else default_local_dir()
            if _inside(local_path, self.root):
                raise CacheError(
                    f"the local tier {local_path} is inside the cache root {self.root}",
                    path=str(local_path),
                    hint="the local (diskcache) tier is per user and must not live on the shared root; "
                    "pass local_dir= elsewhere or set GRAPHPATCH_CACHE_LOCAL_DIR",
                )
            self.local = LocalTier(local_path)

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------------
    def _blob_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def _ref_dir(self, key: str) -> Path:
        return self.root / "refs" / key

    def _check_key(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise CacheError(f"not a cache key: {key!r}", hint="keys are 64 hex digits; see graphpatch_cache.cache_key()")
        return key

    # -- writing ---------------------------------------------------------------------------------
    def _shared_mode(self) -> bool:
        try:
            return bool(os.stat(self.root).st_mode & stat.S_ISGID)
        except OSError:
            return False

    def _mkdir(self, path: Path) -> None:
        if path.is_dir():
            return
        shared = self._shared_mode()
        path.mkdir(parents=True, exist_ok=True)
        if shared:
            current = path
            while current != self.root and _inside(current, self.root):
                with contextlib.suppress(OSError):
                    os.chmod(current, 0o2775)
                current = current.parent

    def _atomic_write(self, dest: Path, data: bytes) -> None:
        """tmp file on the same filesystem, fsync, rename, fsync the directory."""
        self._mkdir(self.root / "tmp")
        self._mkdir(dest.parent)
        tmp = self.root / "tmp" / f"{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if self._shared_mode():
                os.chmod(tmp, 0o664)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with contextlib.suppress(OSError):
            fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put(self, key: str, artifact: GraphArtifact) -> CacheEntry:
        """Store ``artifact`` as a variant of ``key``: blob first, then the ref naming it.

        :raises OSError: the root is read-only or full (nothing half-written stays behind).
        """
        self._check_key(key)
        data = artifact.to_json().encode()
        digest = hashlib.sha256(data).hexdigest()
        blob = self._blob_path(digest)
        if not blob.exists() or _digest_file(blob) != digest:
            self._atomic_write(blob, data)
        variant = signature_key(artifact.signature)
        meta = {
            "digest": digest,
            "size": len(data),
            "created": time.time(),
            "model_class": artifact.model_class,
            "schema_version": artifact.schema_version,
            "versions": artifact.versions,
            "signature": artifact.signature,
        }
        ref = self._ref_dir(key) / f"{variant}.json"
        self._atomic_write(ref, json.dumps(meta, sort_keys=True).encode())
        if self.local is not None:
            self.local.put_blob(digest, data)
        return _entry(key, variant, meta, ref)

    # -- reading ---------------------------------------------------------------------------------
    def _read_ref(self, ref: Path) -> Optional[Dict[str, Any]]:
        try:
            meta = json.loads(ref.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self._quarantine(ref, "unreadable ref")
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("digest"), str):
            self._quarantine(ref, "malformed ref")
            return None
        return meta

    def variants(self, key: str) -> List[CacheEntry]:
        """The variants stored under ``key`` (their refs; blobs are not read)."""
        self._check_key(key)
        folder = self._ref_dir(key)
        out = []
        try:
            refs = sorted(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        for ref in refs:
            if ref.suffix != ".json":
                continue
            meta = self._read_ref(ref)
            if meta is not None:
                out.append(_entry(key, ref.stem, meta, ref))
        return out

    def read_blob(self, digest: str, *, where: str = "") -> Optional[bytes]:
        """The verified bytes of a blob, or ``None`` (missing or corrupt: quarantined, warned)."""
        if self.local is not None:
            data = self.local.get_blob(digest)
            if data is not None:
                if hashlib.sha256(data).hexdigest() == digest:
                    return data
                self.local.drop_blob(digest)
        blob = self._blob_path(digest)
        try:
            data = blob.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            self._quarantine(blob, f"digest mismatch{' for ' + where if where else ''}")
            return None
        if self.local is not None:
            self.local.put_blob(digest, data)
        return data

    def load_entry(self, entry: CacheEntry) -> Optional[GraphArtifact]:
        """The artifact of one entry, or ``None`` when its blob is missing or corrupt.

        :raises ArtifactFormatError: the blob is intact but not an artifact this release reads
            (an unknown ``schema_version``, say), naming the file.
        """
        data = self.read_blob(entry.digest, where=f"key {entry.key[:12]}")
        if data is None:
            return None
        return read_artifact(data, str(self._blob_path(entry.digest)))

    def get(self, key: str, signature: Optional[Dict[str, Any]] = None) -> Optional[GraphArtifact]:
        """An artifact stored under ``key`` (the variant with ``signature``, if given)."""
        for entry in self.variants(key):
            if signature is not None and signature_key(signature) != entry.variant:
                continue
            artifact = self.load_entry(entry)
            if artifact is not None:
                return artifact
        return None

    def contains(self, key: str) -> bool:
        """Whether ``key`` has at least one variant whose blob is present."""
        return any(self._blob_path(e.digest).exists() for e in self.variants(key))

    def resolve(self, prefix: str) -> str:
        """The unique key starting with ``prefix``.

        :raises CacheMissError: no key or several keys start with it.
        """
        prefix = prefix.strip().lower()
        refs = self.root / "refs"
        keys = sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []
        found = [k for k in keys if k.startswith(prefix)] if prefix else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise CacheMissError(f"no cache entry with key {prefix!r} in {self.root}", path=str(self.root),
                                 hint="list entries with CacheStore.entries() or `graphpatch-cache ls`")
        raise CacheMissError(f"key prefix {prefix!r} is ambiguous: {', '.join(k[:12] for k in found[:5])}",
                             path=str(self.root), hint="give more digits")

    def entries(self) -> List[CacheEntry]:
        """Every variant in the store (reads refs only)."""
        refs = self.root / "refs"
        if not refs.is_dir():
            return []
        out: List[CacheEntry] = []
        for folder in sorted(refs.iterdir()):
            if _KEY_RE.match(folder.name):
                out.extend(self.variants(folder.name))
        return out

    # -- maintenance -----------------------------------------------------------------------------
    def _quarantine(self, path: Path, why: str) -> None:
        dest_dir = self.root / "quarantine"
        with contextlib.suppress(OSError):
            self._mkdir(dest_dir)
            os.replace(path, dest_dir / f"{path.name}.{uuid.uuid4().hex[:8]}")
        message = f"graphpatch_cache: {why}: {path} (moved to quarantine; it will be rebuilt)"
        if str(path) not in self._warned:
            self._warned.add(str(path))
            warnings.warn(message, stacklevel=3)

    def verify(self, keys: Optional[List[str]] = None, *, fix: bool = False, rebuild_check: Any = None) -> List[Problem]:
        """Check digests, schema and (optionally) that each artifact rebuilds.

        :param fix: quarantine bad entries (their keys become misses).
        :param rebuild_check: ``fn(artifact)`` raising on failure (the CLI binds a meta model).
        :returns: the problems found; an empty list means everything is intact.
        """
        problems: List[Problem] = []
        entries = self.entries() if keys is None else [e for k in keys for e in self.variants(self._check_key(k))]
        for entry in entries:
            blob = self._blob_path(entry.digest)
            problem = None
            try:
                data = blob.read_bytes()
            except FileNotFoundError:
                problem = "blob missing"
            else:
                if hashlib.sha256(data).hexdigest() != entry.digest:
                    problem = "digest mismatch"
                else:
                    try:
                        artifact = read_artifact(data, str(blob))
                        if rebuild_check is not None:
                            rebuild_check(artifact)
                    except Exception as exc:  # any failure is a problem to report
                        problem = f"invalid artifact: {exc}"
            if problem is None:
                continue
            problems.append(Problem(path=str(blob), key=entry.key, message=problem))
            if fix:
                with contextlib.suppress(OSError):
                    self._mkdir(self.root / "quarantine")
                    if blob.exists():
                        os.replace(blob, self.root / "quarantine" / f"{blob.name}.{uuid.uuid4().hex[:8]}")
                    os.replace(entry.ref_path, self.root / "quarantine" / f"{entry.key}.{entry.variant}.json")
        return problems

    def remove(self, key: str) -> int:
        """Remove every variant of ``key`` (blobs other keys share are kept). Returns the
        number of variants removed.

        :raises CacheMissError: no such key.
        """
        self._check_key(key)
        entries = self.variants(key)
        folder = self._ref_dir(key)
        if not folder.exists():
            raise CacheMissError(f"no cache entry with key {key[:12]}", path=str(folder))
        shutil.rmtree(folder, ignore_errors=True)
        self._drop_unreferenced({e.digest for e in entries})
        return len(entries)

    def _drop_unreferenced(self, digests: set) -> int:
        live = {e.digest for e in self.entries()}
        freed = 0
        for digest in digests - live:
            blob = self._blob_path(digest)
            with contextlib.suppress(OSError):
                freed += blob.stat().st_size
                blob.unlink()
        return freed

    def gc(
        self,
        *,
        older_than: Union[str, float, None] = None,
        max_bytes: Union[str, int, None] = None,
        dry_run: bool = False,
        progress: Any = None,
    ) -> GcReport:
        """Remove variants created more than ``older_than`` ago, then the oldest until the
        store holds at most ``max_bytes``; also stale temp files and unreferenced blobs.

        :param progress: optional ``fn(done, total)`` called as entries are examined.
        """
        report = GcReport(dry_run=dry_run)
        now = time.time()
        entries = sorted(self.entries(), key=lambda e: e.created)
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
        for i, entry in enumerate(doomed):
            report.removed.append(f"{entry.key}/{entry.variant}")
            report.freed_bytes += entry.size
            if not dry_run:
                with contextlib.suppress(OSError):
                    os.unlink(entry.ref_path)
                with contextlib.suppress(OSError):
                    self._ref_dir(entry.key).rmdir()
            if progress is not None:
                progress(i + 1, len(doomed))
        if not dry_run:
            self._drop_unreferenced({e.digest for e in doomed})
            tmp = self.root / "tmp"
            if tmp.is_dir():
                for stale in tmp.iterdir():  # writes abandoned for a day (killed processes)
                    with contextlib.suppress(OSError):
                        if now - stale.stat().st_mtime > 86400:
                            stale.unlink()
        report.kept_bytes = sum(e.size for e in self.entries()) if not dry_run else sum(
            e.size for e in entries if e not in doomed)
        return report

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[bool]:
        """Hold the per-key lock (yields whether it was acquired). Never required for
        correctness: on timeout or an unlockable filesystem the caller just proceeds."""
        if not self.locking:
            yield False
            return
        import filelock

        try:
            self._mkdir(self.root / "locks")
            # group-writable in a shared (setgid) root, so teammates can take the lock too.
            # An OS lock dies with its process, so a killed extraction leaves no stale lock;
            # where locks are fake or never granted, the timeout lets the caller proceed.
            lock = filelock.FileLock(
                str(self.root / "locks" / f"{key}.lock"),
                timeout=self.lock_timeout,
                mode=0o664 if self._shared_mode() else -1,
            )
            lock.acquire()
        except (filelock.Timeout, OSError):
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                lock.release()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _digest_file(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _entry(key: str, variant: str, meta: Dict[str, Any], ref: Path) -> CacheEntry:
    return CacheEntry(
        key=key,
        variant=variant,
        digest=meta["digest"],
        model_class=str(meta.get("model_class", "?")),
        size=int(meta.get("size", 0)),
        created=float(meta.get("created", 0.0)),
        versions=dict(meta.get("versions", {})),
        signature=dict(meta.get("signature", {})),
        ref_path=str(ref),
    )


__all__ = ["CacheEntry", "CacheStore", "GcReport", "Problem", "default_local_dir", "default_root",
           "parse_duration", "parse_size"]
