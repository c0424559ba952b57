"""CacheStore: content-addressed artifacts on a plain filesystem, safe to share.

Layout under the root::

    objects/ab/abcdef...   immutable blobs, named by the sha256 of their bytes
    refs/<key>/<sig>.json  small files naming a blob, one per graph variant of a key
    tmp/                   writes in progress (same filesystem, so renames are atomic)
    quarantine/            blobs and refs that failed verification
    locks/<key>.lock       advisory locks that only avoid duplicate extractions

Writes go to ``tmp/``, are fsynced and renamed into place; the blob is published before
the ref that names it. Readers verify every blob's digest: a corrupt or missing blob is a
miss (quarantined, warned about once), never a wrong graph. Locks are advisory (:mod:`.locking`).

A ref records what its key was computed from (the key material, less the module/tensor
lists the artifact holds) and the example inputs the graphs were extracted with, so an entry
can prove it belongs to its key (:mod:`graphpatch_cache.cache.proof`) and be rebuilt
(:mod:`graphpatch_cache.cache.rebuild`). Reads change nothing on disk, except the loader's
(``variants(repair=True)``, :meth:`CacheStore.read_blob`), which quarantines what it cannot
use; :meth:`CacheStore.check` without ``fix`` is read-only.

A per-user local tier (:class:`~graphpatch_cache.cache.local.LocalTier`, diskcache) sits in
front of the shared root and memoizes blobs by digest; it never lives under the root.
Defaults and units: :mod:`.settings`; entries: :mod:`.records`; check/gc: :mod:`.maintenance`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .._files import write_atomic
from ..errors import CacheError, CacheMissError
from . import maintenance, repair
from .local import LocalTier
from .locking import advisory_lock
from .records import CacheEntry, CheckReport, GcReport, Problem, clip_origin, entry_from_ref, read_ref
from .settings import default_local_dir, default_root, is_key, parse_duration, parse_size

if TYPE_CHECKING:  # deferred below: listing, rm and gc run without torch (the command line's speed)
    from ..artifact import GraphArtifact
    from .maintenance import ArtifactCheck


class CacheStore:
    """A graph cache rooted at ``root`` (default: :func:`default_root`).

    :param local_dir: the per-user local tier (diskcache); ``None`` for the default,
        ``False`` to disable it. It must not be inside ``root``.
    :param locking: take a per-key file lock around extraction (only avoids duplicate work).
    :param lock_timeout: seconds to wait for another process's extraction before doing it too.
    """

    def __init__(
        self,
        root: Union[str, "os.PathLike[str]", None] = None,
        *,
        local_dir: Union[str, "os.PathLike[str]", None, bool] = None,
        locking: bool = True,
        lock_timeout: float = 600.0,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.locking = locking
        self.lock_timeout = lock_timeout
        self._warned: set[str] = set()
        self.local: Optional[LocalTier] = None
        if local_dir is not False:
            local_path = default_local_dir() if local_dir is None or local_dir is True else Path(local_dir).expanduser()
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
        if not is_key(key):
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
        """:func:`~graphpatch_cache._files.write_atomic` via ``tmp/`` (same filesystem),
        group-writable in a shared root, the directory fsynced too."""
        self._mkdir(self.root / "tmp")
        self._mkdir(dest.parent)
        write_atomic(dest, data, tmp_dir=self.root / "tmp", mode=0o664 if self._shared_mode() else None,
                     sync_dir=True)

    def put(
        self,
        key: str,
        artifact: GraphArtifact,
        *,
        material: Optional[Dict[str, Any]] = None,
        example: Optional[Dict[str, Any]] = None,
        recorded: Optional[Dict[str, Any]] = None, origin: Optional[str] = None,
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
        :param origin: what it was built from, display text only (:func:`.records.clip_origin`).
        :raises CacheError: the material does not prove that ``artifact`` belongs to ``key``
            (nothing is written).
        :raises OSError: the root is read-only or full (nothing half-written stays behind).
        """
        from ..artifact.signature import signature_key  # deferred: imports torch
        from .proof import entry_disagreement, recorded_material  # deferred: imports torch
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
            **({"origin": clip_origin(origin)} if clip_origin(origin) else {}),
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
            repair.remember(self, digest)
        return entry_from_ref(key, variant, meta, ref)

    # -- reading ---------------------------------------------------------------------------------
    def _scan(self, key: str) -> Tuple[List[CacheEntry], List[Tuple[Path, str]]]:
        """The parsed refs of ``key`` and the ones that are not (path, why). Changes nothing."""
        folder = self._ref_dir(key)
        try:
            refs = sorted(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        entries: List[CacheEntry] = []
        bad: List[Tuple[Path, str]] = []
        for ref in refs:
            if ref.suffix != ".json":
                continue
            entry, why = read_ref(key, ref)
            if entry is not None:
                entries.append(entry)
            elif why != "gone":
                bad.append((ref, why))
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
                self.quarantine(ref, why=why, name=f"{key}.{ref.name}")
        return entries

    def read_blob(self, digest: str, *, where: str = "") -> Optional[bytes]:
        """The verified bytes of a blob, or ``None`` (missing or corrupt: quarantined, warned)."""
        if self.local is not None:
            data = self.local.get_blob(digest)
            if data is not None:
                if hashlib.sha256(data).hexdigest() == digest:
                    repair.check_shared_copy(self, digest, data)
                    return data
                self.local.drop_blob(digest)
        blob = self._blob_path(digest)
        try:
            data = blob.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            self.quarantine(blob, why=f"digest mismatch{' for ' + where if where else ''}")
            return None
        if self.local is not None:
            self.local.put_blob(digest, data)
            repair.remember(self, digest)
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
        from ..trust.validate import read_artifact  # deferred: imports torch
        data = self.read_blob(entry.digest, where=f"key {entry.key[:12]}")
        if data is None:
            return None
        return read_artifact(data, str(self._blob_path(entry.digest)), remembered=self.local)

    def get(self, key: str, signature: Optional[Dict[str, Any]] = None) -> Optional[GraphArtifact]:
        """An artifact stored under ``key`` (the variant with ``signature``, if given)."""
        from ..artifact.signature import signature_key  # deferred: imports torch
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
        found = [k for k in self.keys() if k.startswith(prefix)] if prefix else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise CacheMissError(f"no cache entry with key {prefix!r} in {self.root}", path=str(self.root),
                                 hint="`graphpatch-cache ls` lists the keys")
        raise CacheMissError(f"key prefix {prefix!r} is ambiguous: {', '.join(k[:12] for k in found[:5])}",
                             path=str(self.root), hint="give more digits")

    def keys(self) -> List[str]:
        """Every key with a ref folder (also one whose refs are all malformed)."""
        refs = self.root / "refs"
        return sorted(p.name for p in refs.iterdir() if is_key(p.name)) if refs.is_dir() else []

    def entries(self) -> List[CacheEntry]:
        """Every variant in the store (reads refs only)."""
        return [entry for key in self.keys() for entry in self.variants(key)]

    # -- quarantine and maintenance (:mod:`.maintenance`) ----------------------------------------
    def quarantine(self, path: Path, *, why: Optional[str] = None, name: str = "") -> bool:
        """Move ``path`` (a blob or a ref) to ``quarantine/`` (as ``name``, default its own
        name, plus a random suffix); with ``why``, warn once per path that it will be rebuilt.
        Returns whether it was moved (it may be gone already)."""
        try:
            self._mkdir(self.root / "quarantine")
            os.replace(path, self.root / "quarantine" / f"{name or path.name}.{uuid.uuid4().hex[:8]}")
            moved = True
        except OSError:
            moved = False
        if why is not None and str(path) not in self._warned:
            self._warned.add(str(path))
            warnings.warn(f"graphpatch_cache: {why}: {path} (moved to quarantine; it will be rebuilt)", stacklevel=3)
        return moved

    def quarantine_ref(self, entry: CacheEntry, why: str) -> None:
        """Move ``entry``'s ref to ``quarantine/`` (its key becomes a miss for that variant)
        and warn once. Its blob stays: another key's ref may name it legitimately (``gc``
        removes it once nothing does)."""
        self.quarantine(Path(entry.ref_path), why=f"{why}; ref", name=f"{entry.key}.{Path(entry.ref_path).name}")

    def quarantine_variant(self, key: str, variant: str) -> bool:
        """Move the ref of ``key``'s ``variant`` to ``quarantine/`` (no warning: for
        ``verify --fix``). Returns whether a ref was moved."""
        self._check_key(key)
        ref = self._ref_dir(key) / f"{variant}.json"
        if ref.parent != self._ref_dir(key) or not ref.is_file():
            return False
        return self.quarantine(ref, name=f"{key}.{ref.name}")

    def check(self, keys: Optional[List[str]] = None, *, fix: bool = False,
              rebuild_check: Optional[ArtifactCheck] = None) -> CheckReport:
        """The loader's checks and the key proof for every ref (of ``keys``, or of the whole
        store); with ``fix``, bad entries are quarantined. See :func:`.maintenance.check`."""
        return maintenance.check(self, keys, fix=fix, rebuild_check=rebuild_check)

    def verify(self, keys: Optional[List[str]] = None, *, fix: bool = False,
               rebuild_check: Optional[ArtifactCheck] = None) -> List[Problem]:
        """The problems :meth:`check` finds (an empty list: everything is intact)."""
        return self.check(keys, fix=fix, rebuild_check=rebuild_check).problems

    def remove(self, key: str) -> int:
        """Remove every variant of ``key``. See :func:`.maintenance.remove`."""
        return maintenance.remove(self, key)

    def gc(
        self,
        *,
        older_than: Union[str, float, None] = None,
        max_bytes: Union[str, int, None] = None,
        dry_run: bool = False,
        progress: Optional[Callable[[int, int], Any]] = None,
    ) -> GcReport:
        """Remove old entries, then the oldest beyond ``max_bytes``. See :func:`.maintenance.gc`."""
        return maintenance.gc(self, older_than=older_than, max_bytes=max_bytes, dry_run=dry_run, progress=progress)

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[bool]:
        """Hold the per-key lock (yields whether it was acquired). Never required for
        correctness: on timeout or an unlockable filesystem the caller just proceeds."""
        if not self.locking:
            yield False
            return
        try:
            self._mkdir(self.root / "locks")
        except OSError:
            yield False
            return
        with advisory_lock(self.root / "locks" / f"{key}.lock", timeout=self.lock_timeout,
                           group_writable=self._shared_mode()) as acquired:
            yield acquired


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


# the records and settings stay importable from here, where they used to live
__all__ = ["CacheEntry", "CacheStore", "CheckReport", "GcReport", "Problem", "default_local_dir", "default_root",
           "parse_duration", "parse_size"]
