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

A ref records what its key was computed from (the key material, less the module/tensor
lists the artifact holds) and the example inputs the graphs were extracted with, so an entry
can prove it belongs to its key (:mod:`graphpatch_cache.cache.proof`) and be rebuilt
(:mod:`graphpatch_cache.cache.rebuild`). Reads change nothing on disk, except the loader's
(``variants(repair=True)``, :meth:`CacheStore.read_blob`), which quarantines what it cannot
use; :meth:`CacheStore.check` without ``fix`` is read-only.

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
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ..artifact import GraphArtifact
from ..errors import CacheError, CacheMissError
from ..artifact.signature import signature_key
from ..trust.validate import read_artifact
from .local import LocalTier
from .proof import entry_disagreement, recorded_material

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
    #: the key material the ref records (less the module/tensor lists); None in refs of older releases
    material: Optional[Dict[str, Any]] = field(repr=False, default=None)
    #: the concrete signature of the example inputs the graphs were extracted with
    example: Optional[Dict[str, Any]] = field(repr=False, default=None)

    def ref(self) -> Dict[str, Any]:
        """The ref's fields that the proof (:mod:`~graphpatch_cache.cache.proof`) reads."""
        return {"material": self.material, "signature": self.signature, "example": self.example}


@dataclass(frozen=True)
class Problem:
    """Something :meth:`CacheStore.check` found wrong.

    :ivar kind: ``malformed-ref``, ``missing-blob``, ``corrupt-blob``, ``invalid-artifact``,
        ``wrong-key`` (the entry does not belong to its key), ``unproven`` (its ref records
        no key material: written by an older release, or ``import --key`` of a ``pg.save()``
        file), ``rebuild-differs`` or ``cannot-rebuild`` (``verify --rebuild``).
    """

    path: str
    key: str
    message: str
    variant: str = ""
    kind: str = ""


@dataclass
class CheckReport:
    """What :meth:`CacheStore.check` looked at and found."""

    checked: int = 0
    problems: List[Problem] = field(default_factory=list)
    fixed: bool = False


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

    def put(
        self,
        key: str,
        artifact: GraphArtifact,
        *,
        material: Optional[Dict[str, Any]] = None,
        example: Optional[Dict[str, Any]] = None,
        recorded: Optional[Dict[str, Any]] = None,
    ) -> CacheEntry:
        """Store ``artifact`` as a variant of ``key``: blob first, then the ref naming it.

        :param material: the key material ``key`` is the digest of
            (:func:`~graphpatch_cache.cache.keys.key_material`); the ref records it, less the
            module/tensor lists, so the entry can prove it belongs to ``key``. Without it (or
            ``recorded``) the entry is unproven: ``load_cached`` still checks it against the
            live model, ``verify`` reports it.
        :param example: the concrete signature of the example inputs
            (:func:`~graphpatch_cache.signature.concrete_signature`), for ``verify --rebuild``.
        :param recorded: the material as a ref records it (``import``: from another ref).
        :raises CacheError: the material does not prove that ``artifact`` belongs to ``key``
            (nothing is written).
        :raises OSError: the root is read-only or full (nothing half-written stays behind).
        """
        self._check_key(key)
        data = artifact.to_json().encode()
        digest = hashlib.sha256(data).hexdigest()
        variant = signature_key(artifact.signature)
        meta: Dict[str, Any] = {
            "digest": digest,
            "size": len(data),
            "created": time.time(),
            "model_class": artifact.model_class,
            "schema_version": artifact.schema_version,
            "versions": artifact.versions,
            "signature": artifact.signature,
        }
        if material is not None:
            recorded = recorded_material(material)
        if recorded is not None:
            meta["material"] = recorded
            if example is not None:
                meta["example"] = example
            why = entry_disagreement(key, variant, meta, artifact)
            if why is not None:
                raise CacheError(f"not storing the artifact under key {key[:12]}: {why}", path=str(self.root),
                                 hint="the key material does not describe this artifact; compute both from the "
                                      "same model and inputs")
        blob = self._blob_path(digest)
        if not blob.exists() or _digest_file(blob) != digest:
            self._atomic_write(blob, data)
        ref = self._ref_dir(key) / f"{variant}.json"
        self._atomic_write(ref, json.dumps(meta, sort_keys=True).encode())
        if self.local is not None:
            self.local.put_blob(digest, data)
        return _entry(key, variant, meta, ref)

    # -- reading ---------------------------------------------------------------------------------
    def _scan(self, key: str) -> Tuple[List[CacheEntry], List[Tuple[Path, str]]]:
        """The parsed refs of ``key`` and the ones that are not (path, why). Changes nothing."""
        folder = self._ref_dir(key)
        try:
            refs = sorted(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        entries, bad = [], []
        for ref in refs:
            if ref.suffix != ".json":
                continue
            try:
                meta = json.loads(ref.read_bytes())
            except FileNotFoundError:
                continue  # removed meanwhile (gc, another process's repair)
            except (OSError, ValueError, RecursionError):
                bad.append((ref, "unreadable ref"))
                continue
            entry = _parse_ref(key, ref, meta)
            if entry is None:
                bad.append((ref, "malformed ref"))
            else:
                entries.append(entry)
        return entries, bad

    def variants(self, key: str, *, repair: bool = False) -> List[CacheEntry]:
        """The variants stored under ``key`` (their refs; blobs are not read).

        :param repair: quarantine refs that are unreadable or malformed (warned about once);
            by default nothing on disk changes and such refs are skipped.
        """
        self._check_key(key)
        entries, bad = self._scan(key)
        if repair:
            for ref, why in bad:
                self._quarantine(ref, why, name=f"{key}.{ref.name}")
        return entries

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

    def _read_shared(self, digest: str) -> Tuple[Optional[bytes], str]:
        """The shared blob's bytes and ``""``, or ``None`` and why (``missing``/``corrupt``).
        Changes nothing (not even the local tier)."""
        try:
            data = self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None, "missing"
        except OSError as exc:
            return None, f"unreadable ({exc.strerror or exc})"
        if hashlib.sha256(data).hexdigest() != digest:
            return None, "corrupt"
        return data, ""

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

    def keys(self) -> List[str]:
        """Every key with a ref folder (also one whose refs are all malformed)."""
        refs = self.root / "refs"
        return sorted(p.name for p in refs.iterdir() if _KEY_RE.match(p.name)) if refs.is_dir() else []

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
    def _move_to_quarantine(self, path: Path, name: str = "") -> bool:
        try:
            self._mkdir(self.root / "quarantine")
            os.replace(path, self.root / "quarantine" / f"{name or path.name}.{uuid.uuid4().hex[:8]}")
            return True
        except OSError:
            return False

    def _quarantine(self, path: Path, why: str, *, name: str = "") -> None:
        self._move_to_quarantine(path, name)
        message = f"graphpatch_cache: {why}: {path} (moved to quarantine; it will be rebuilt)"
        if str(path) not in self._warned:
            self._warned.add(str(path))
            warnings.warn(message, stacklevel=3)

    def quarantine_ref(self, entry: CacheEntry, why: str) -> None:
        """Move ``entry``'s ref to ``quarantine/`` (its key becomes a miss for that variant)
        and warn once. Its blob stays: another key's ref may name it legitimately (``gc``
        removes it once nothing does)."""
        self._quarantine(Path(entry.ref_path), f"{why}; ref", name=f"{entry.key}.{Path(entry.ref_path).name}")

    def quarantine_variant(self, key: str, variant: str) -> bool:
        """Move the ref of ``key``'s ``variant`` to ``quarantine/`` (no warning: for
        ``verify --fix``). Returns whether a ref was moved."""
        self._check_key(key)
        ref = self._ref_dir(key) / f"{variant}.json"
        if ref.parent != self._ref_dir(key) or not ref.is_file():
            return False
        return self._move_to_quarantine(ref, f"{key}.{ref.name}")

    def check(self, keys: Optional[List[str]] = None, *, fix: bool = False, rebuild_check: Any = None) -> CheckReport:
        """Check every ref (of ``keys``, or of the whole store) the way the loader would:
        the ref parses, its blob is present with the right digest, the artifact passes
        :func:`~graphpatch_cache.validate.read_artifact` (schema, allowlist, argument and
        structure rules), and the entry proves it belongs to its key
        (:func:`~graphpatch_cache.cache.proof.entry_disagreement`).

        Without ``fix`` nothing on disk changes. With ``fix`` each bad ref is quarantined,
        and so is its blob where the blob itself is bad (corrupt, or not a loadable artifact);
        an intact blob that is merely under the wrong key stays (another key may name it).

        :param rebuild_check: ``fn(artifact)`` raising on failure, for extra checks.
        """
        report = CheckReport(fixed=fix)
        for key in self.keys() if keys is None else keys:
            entries, bad = self._scan(self._check_key(key))
            report.checked += len(entries) + len(bad)
            for ref, why in bad:
                report.problems.append(Problem(path=str(ref), key=key, message=why, variant=ref.stem, kind="malformed-ref"))
                if fix:
                    self._move_to_quarantine(ref, f"{key}.{ref.name}")
            for entry in entries:
                problem, blob_too = self._check_entry(entry, rebuild_check)
                if problem is None:
                    continue
                report.problems.append(problem)
                if fix:
                    if blob_too:
                        self._move_to_quarantine(self._blob_path(entry.digest))
                    self._move_to_quarantine(Path(entry.ref_path), f"{entry.key}.{Path(entry.ref_path).name}")
        return report

    def _check_entry(self, entry: CacheEntry, rebuild_check: Any) -> Tuple[Optional[Problem], bool]:
        """(the entry's problem or None, whether its blob is bad too)."""
        blob = str(self._blob_path(entry.digest))

        def problem(kind: str, message: str, path: str = blob) -> Problem:
            return Problem(path=path, key=entry.key, message=message, variant=entry.variant, kind=kind)

        data, why = self._read_shared(entry.digest)
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
        why = entry_disagreement(entry.key, entry.variant, entry.ref(), artifact)
        if why is not None:
            kind = "unproven" if entry.material is None else "wrong-key"
            return problem(kind, f"does not belong to its key: {why}", entry.ref_path), False
        return None, False

    def verify(self, keys: Optional[List[str]] = None, *, fix: bool = False, rebuild_check: Any = None) -> List[Problem]:
        """The problems :meth:`check` finds (an empty list: everything is intact)."""
        return self.check(keys, fix=fix, rebuild_check=rebuild_check).problems

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
        material=meta.get("material"),
        example=meta.get("example"),
    )


_REF_TYPES = {"size": int, "created": (int, float), "model_class": str, "versions": dict, "signature": dict,
              "material": dict, "example": dict}


def _parse_ref(key: str, ref: Path, meta: Any) -> Optional[CacheEntry]:
    """A ref's entry, or None when it is not a well-formed ref (a digest of 64 hex digits,
    fields of the types ``put`` writes)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("digest"), str) or not _KEY_RE.match(meta["digest"]):
        return None
    for name, types in _REF_TYPES.items():
        if name in meta and (not isinstance(meta[name], types) or isinstance(meta[name], bool)):
            return None
    return _entry(key, ref.stem, meta, ref)


__all__ = ["CacheEntry", "CacheStore", "CheckReport", "GcReport", "Problem", "default_local_dir", "default_root",
           "parse_duration", "parse_size"]
