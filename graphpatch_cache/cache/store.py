"""CacheStore: content-addressed artifacts on a filesystem or object storage, safe to share.

The root is a directory, or any fsspec URL (``s3://bucket/prefix``: :mod:`.remote`); a root
backend (:mod:`.backend`) reads and writes names under it. Layout under the root::

    objects/ab/abcdef...   immutable blobs, named by the sha256 of their bytes
    refs/<key>/<sig>.json  small files naming a blob, one per graph variant of a key
    tmp/                   writes in progress (same filesystem, so renames are atomic)
    quarantine/            blobs and refs that failed verification
    locks/<key>.lock       advisory locks that only avoid duplicate extractions

Writes are atomic (in a directory: to ``tmp/``, fsynced, renamed into place; on object storage
a PUT is); the blob is published before the ref that names it. Readers verify every blob's digest: a corrupt or missing blob is a
miss (quarantined, warned about once), never a wrong graph. Locks are advisory (:mod:`.locking`).

A ref records what its key was computed from (the key material, less the module/tensor
lists the artifact holds) and the example inputs the graphs were extracted with, so an entry
can prove it belongs to its key (:mod:`graphpatch_cache.cache.proof`) and be rebuilt
(:mod:`graphpatch_cache.cache.rebuild`). Reads change nothing on disk, except the loader's
(``variants(repair=True)``, :meth:`CacheStore.read_blob`), which quarantines what it cannot
use; :meth:`CacheStore.check` without ``fix`` is read-only.

A per-user local tier (:class:`~graphpatch_cache.cache.local.LocalTier`, diskcache) sits in
front of the shared root and memoizes blobs by digest; it never lives under the root. In front
of a remote root it also remembers the refs it read, so hits work offline (:mod:`.offline`).
Defaults and units: :mod:`.settings`; entries: :mod:`.records`; check/gc: :mod:`.maintenance`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from ..errors import CacheError, CacheMissError, RemoteStoreError
from . import maintenance, offline, repair
from .backend import PosixRoot, RootBackend, inside, open_root
from .local import LocalTier
from .locking import advisory_lock
from .records import CacheEntry, CheckReport, GcReport, Problem, clip_origin, entry_from_ref, read_ref
from .settings import default_local_dir, default_root, is_key, parse_duration, parse_size

if TYPE_CHECKING:  # deferred below: listing, rm and gc run without torch (the command line's speed)
    from ..artifact import GraphArtifact
    from .maintenance import ArtifactCheck


class CacheStore:
    """A graph cache rooted at ``root`` (default: :func:`default_root`): a directory, or an
    fsspec URL such as ``s3://bucket/prefix`` (the ``[s3]`` extra).

    :param local_dir: the per-user local tier (diskcache); ``None`` for the default,
        ``False`` to disable it. It must not be inside ``root``.
    :param locking: take a per-key file lock around extraction (only avoids duplicate work).
    :param lock_timeout: seconds to wait for another process's extraction before doing it too.
    :param storage_options: for a URL root, the fsspec filesystem's options (an endpoint,
        credentials); by default the backend's own configuration (environment, config files).
    """

    def __init__(
        self,
        root: Union[str, "os.PathLike[str]", None] = None,
        *,
        local_dir: Union[str, "os.PathLike[str]", None, bool] = None,
        locking: bool = True,
        lock_timeout: float = 600.0,
        storage_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.backend: RootBackend = open_root(root if root is not None else default_root(), storage_options)
        #: a ``Path`` for a directory, the URL string for a remote root
        self.root: Union[Path, str] = self.backend.root
        self.locking = locking
        self.lock_timeout = lock_timeout
        self._warned: set[str] = set()
        self._listed: set[str] = set()  # keys whose refs the loader listed (see .offline.loader_scan)
        self.local: Optional[LocalTier] = None
        if local_dir is not False:
            local_path = default_local_dir() if local_dir is None or local_dir is True else Path(local_dir).expanduser()
            if isinstance(self.root, Path) and inside(local_path, self.root):
                raise CacheError(
                    f"the local tier {local_path} is inside the cache root {self.root}",
                    path=str(local_path),
                    hint="the local (diskcache) tier is per user and must not live on the shared root; "
                    "pass local_dir= elsewhere or set GRAPHPATCH_CACHE_LOCAL_DIR",
                )
            self.local = LocalTier(local_path)

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"

    # -- names (relative to the root) ------------------------------------------------------------
    @staticmethod
    def _blob_name(digest: str) -> str:
        return f"objects/{digest[:2]}/{digest}"

    @staticmethod
    def _ref_name(key: str, variant: str) -> str:
        return f"refs/{key}/{variant}.json"

    def _blob_path(self, digest: str) -> str:
        """Where the blob of ``digest`` is (a path or a URL), for messages."""
        return self.backend.location(self._blob_name(digest))

    def location(self, name: str) -> str:
        """Where the file ``name`` (relative to the root) is: a path or a URL."""
        return self.backend.location(name)

    def _check_key(self, key: str) -> str:
        if not is_key(key):
            raise CacheError(f"not a cache key: {key!r}", hint="keys are 64 hex digits; see graphpatch_cache.cache_key()")
        return key

    # -- writing ---------------------------------------------------------------------------------
    def _publish_blob(self, digest: str, data: bytes) -> None:
        """Make the blob of ``digest`` hold ``data`` (verified bytes): created if absent
        (conditionally where the root can), rewritten only when what is there is damaged."""
        if not self.backend.create(self._blob_name(digest), data):
            present, _why = self._read_shared(digest)
            if present is None:
                self.backend.write(self._blob_name(digest), data)

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
        self._publish_blob(digest, data)
        ref = self._ref_name(key, variant)
        # last writer wins: every writer's ref names a complete, verified blob of this variant
        self.backend.write(ref, json.dumps(meta, sort_keys=True).encode())
        if self.local is not None:
            self.local.put_blob(digest, data)
            repair.remember(self, digest)
        return entry_from_ref(key, variant, meta, self.location(ref))

    # -- reading ---------------------------------------------------------------------------------
    def _scan(self, key: str) -> Tuple[List[CacheEntry], List[Tuple[str, str]]]:
        """The parsed refs of ``key`` and the ones that are not (name, why). Changes nothing.

        :raises RemoteStoreError: a remote root cannot be reached.
        """
        return self._read_refs(key, self.backend.list(f"refs/{key}"))

    def _read_refs(self, key: str, files: List[str]) -> Tuple[List[CacheEntry], List[Tuple[str, str]]]:
        entries: List[CacheEntry] = []
        bad: List[Tuple[str, str]] = []
        for file in files:
            if not file.endswith(".json"):
                continue
            name = f"refs/{key}/{file}"
            entry, why = read_ref(key, file[: -len(".json")], self.location(name),
                                  lambda name=name: self.backend.read(name))  # type: ignore[misc]
            if entry is not None:
                entries.append(entry)
            elif why != "gone":
                bad.append((name, why))
        return entries, bad

    def variants(self, key: str, *, repair: bool = False) -> List[CacheEntry]:
        """The variants stored under ``key`` (their refs; blobs are not read).

        :param repair: the loader's read: quarantine refs that are unreadable or malformed
            (warned about once), and when a remote root cannot be reached, use the refs the
            local tier remembers from it (warned about once). By default nothing changes and
            such refs are skipped.
        """
        self._check_key(key)
        if not repair:
            return self._scan(key)[0]
        try:
            entries, bad = offline.loader_scan(self, key)
        except RemoteStoreError as exc:
            return offline.remembered_variants(self, key, exc)
        offline.remember_variants(self, key, entries)
        for name, why in bad:
            self.quarantine(name, why=why, label=f"{key}.{name.rsplit('/', 1)[-1]}")
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
        try:
            data = self.backend.read(self._blob_name(digest))
        except (FileNotFoundError, RemoteStoreError):  # unreachable: a miss (load_cached warns once)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            self.quarantine(self._blob_name(digest), why=f"digest mismatch{' for ' + where if where else ''}")
            return None
        if self.local is not None:
            self.local.put_blob(digest, data)
            repair.remember(self, digest)
        return data

    def _read_shared(self, digest: str) -> Tuple[Optional[bytes], str]:
        """The shared blob's bytes and ``""``, or ``None`` and why (``missing``/``corrupt``).
        Changes nothing (not even the local tier)."""
        try:
            data = self.backend.read(self._blob_name(digest))
        except FileNotFoundError:
            return None, "missing"
        except RemoteStoreError:
            raise  # the root, not the blob: verify and sync say so instead of reporting blobs
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
        return read_artifact(data, self._blob_path(entry.digest), remembered=self.local)

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
        return any(self.backend.exists(self._blob_name(e.digest)) for e in self.variants(key))

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
        return [name for name in self.backend.list("refs") if is_key(name)]

    def entries(self) -> List[CacheEntry]:
        """Every variant in the store (reads refs only)."""
        return [entry for key in self.keys() for entry in self.variants(key)]

    # -- quarantine and maintenance (:mod:`.maintenance`) ----------------------------------------
    def quarantine(self, name: str, *, why: Optional[str] = None, label: str = "") -> bool:
        """Move the file ``name`` (a blob or a ref, relative to the root) to ``quarantine/`` (as
        ``label``, default its own name, plus a random suffix); with ``why``, warn once per file
        that it will be rebuilt. Returns whether it was moved (it may be gone already)."""
        try:
            self.backend.move(name, f"quarantine/{label or name.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}")
            moved = True
        except OSError:
            moved = False
        where = self.location(name)
        if why is not None and where not in self._warned:
            self._warned.add(where)
            warnings.warn(f"graphpatch_cache: {why}: {where} (moved to quarantine; it will be rebuilt)", stacklevel=3)
        return moved

    def quarantine_ref(self, entry: CacheEntry, why: str) -> None:
        """Move ``entry``'s ref to ``quarantine/`` (its key becomes a miss for that variant)
        and warn once. Its blob stays: another key's ref may name it legitimately (``gc``
        removes it once nothing does)."""
        self.quarantine(self._ref_name(entry.key, entry.variant), why=f"{why}; ref",
                        label=f"{entry.key}.{entry.variant}.json")

    def quarantine_variant(self, key: str, variant: str) -> bool:
        """Move the ref of ``key``'s ``variant`` to ``quarantine/`` (no warning: for
        ``verify --fix``). Returns whether a ref was moved."""
        self._check_key(key)
        if "/" in variant or "\\" in variant or variant.startswith(".") or \
                not self.backend.exists(self._ref_name(key, variant)):
            return False
        return self.quarantine(self._ref_name(key, variant), label=f"{key}.{variant}.json")

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
        if isinstance(self.backend, PosixRoot):
            with self.backend.lock(f"locks/{key}.lock", self.lock_timeout) as acquired:
                yield acquired
            return
        if self.local is None:  # object storage has no locks, and there is no local tier to lock in
            yield False
            return
        path = self.local.lock_path(str(self.root), key)  # this machine's processes only
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
        with advisory_lock(path, timeout=self.lock_timeout, group_writable=False) as acquired:
            yield acquired


# the records and settings stay importable from here, where they used to live
__all__ = ["CacheEntry", "CacheStore", "CheckReport", "GcReport", "Problem", "default_local_dir", "default_root",
           "parse_duration", "parse_size"]
