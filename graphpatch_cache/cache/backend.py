"""Where a store's files live: a root backend, addressed by names relative to the root.

The store (:mod:`.store`) says what to write and in what order (a blob under its digest, then
the ref naming it); a backend says how a name is read, written and listed on one kind of root:

- :class:`PosixRoot`: a directory (today's layout and guarantees: a write goes to ``tmp/``, is
  fsynced and renamed into place; a setgid root stays group-writable; per-key file locks);
- :class:`~graphpatch_cache.cache.remote.FsspecRoot`: any fsspec URL (``s3://``, ``gs://``,
  ``az://``, ``memory://``), where a PUT is atomic by itself (object stores never show half
  an object) and a blob is created with a conditional write where the backend has one.

``file://`` URLs are plain directories (:class:`PosixRoot`). Names use ``/`` on every root.
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_module
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from .._files import write_atomic
from .locking import advisory_lock

#: what ``CacheStore(root)`` takes
RootLike = Union[str, "os.PathLike[str]"]


class RootBackend:
    """The operations the store needs from a root; ``name`` is relative (``refs/<key>/x.json``).

    Reads raise ``FileNotFoundError`` for a name that is not there and another ``OSError``
    when it cannot be read (a remote root that cannot be reached:
    :class:`~graphpatch_cache.errors.RemoteStoreError`).
    """

    #: the root as the user named it: a ``Path`` (a directory) or a URL string
    root: Union[Path, str]
    #: on object storage (no local files, no locks, no stat worth remembering)
    remote: bool = False
    #: :meth:`create` is a conditional write (S3 ``If-None-Match: *``); otherwise it checks,
    #: then writes, and two writers of one name write the same bytes (content-addressed)
    conditional: bool = False

    def location(self, name: str) -> str:
        """Where ``name`` is, for messages (a path, or a URL)."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` atomically: a reader sees the old bytes or all the new."""
        raise NotImplementedError

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` unless it exists; whether this call wrote it."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, folder: str) -> List[str]:
        """The names directly under ``folder`` (files and folders), sorted; none if absent."""
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def move(self, name: str, dest: str) -> None:
        raise NotImplementedError

    def remove_folder(self, folder: str) -> None:
        """Remove ``folder`` if it is empty (object stores have no folders: nothing to do)."""

    def stat(self, name: str) -> Optional[Tuple[int, ...]]:
        """A fingerprint of ``name``'s file that changes when it is rewritten, or ``None``."""
        return None

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[bool]:
        """Hold the advisory lock ``name`` (yields whether it was acquired)."""
        yield False

    def clean_tmp(self, older_than: float) -> None:
        """Remove writes abandoned (killed writers) more than ``older_than`` seconds ago."""


class PosixRoot(RootBackend):
    """A directory, possibly on a shared filesystem (NFS, Lustre)."""

    root: Path

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def location(self, name: str) -> str:
        return str(self.root / name)

    def shared_mode(self) -> bool:
        """Whether the root is setgid (a team's shared root: keep everything group-writable)."""
        try:
            return bool(os.stat(self.root).st_mode & stat_module.S_ISGID)
        except OSError:
            return False

    def mkdir(self, path: Path) -> None:
        if path.is_dir():
            return
        shared = self.shared_mode()
        path.mkdir(parents=True, exist_ok=True)
        if shared:
            current = path
            while current != self.root and inside(current, self.root):
                with contextlib.suppress(OSError):
                    os.chmod(current, 0o2775)
                current = current.parent

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        """:func:`~graphpatch_cache._files.write_atomic` via ``tmp/`` (same filesystem),
        group-writable in a shared root, the directory fsynced too."""
        dest = self.path(name)
        self.mkdir(self.root / "tmp")
        self.mkdir(dest.parent)
        write_atomic(dest, data, tmp_dir=self.root / "tmp", mode=0o664 if self.shared_mode() else None,
                     sync_dir=True)

    def create(self, name: str, data: bytes) -> bool:
        if self.path(name).exists():
            return False
        self.write(name, data)  # atomic rename: two racing writers of one blob write the same bytes
        return True

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def list(self, folder: str) -> List[str]:
        try:
            return sorted(p.name for p in self.path(folder).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size

    def delete(self, name: str) -> None:
        self.path(name).unlink()

    def move(self, name: str, dest: str) -> None:
        self.mkdir(self.path(dest).parent)
        os.replace(self.path(name), self.path(dest))

    def remove_folder(self, folder: str) -> None:
        with contextlib.suppress(OSError):  # not empty: a writer may be adding to it this very moment
            self.path(folder).rmdir()

    def stat(self, name: str) -> Optional[Tuple[int, ...]]:
        try:
            st = os.stat(self.path(name))
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[bool]:
        try:
            self.mkdir(self.path(name).parent)
        except OSError:
            yield False
            return
        with advisory_lock(self.path(name), timeout=timeout, group_writable=self.shared_mode()) as acquired:
            yield acquired

    def clean_tmp(self, older_than: float) -> None:
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return
        now = time.time()
        for stale in tmp.iterdir():
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > older_than:
                    stale.unlink()


def is_url(root: object) -> bool:
    """Whether ``root`` names a URL (``scheme://...``) rather than a directory."""
    return isinstance(root, str) and "://" in root and not root.startswith("/")


def open_root(root: RootLike, storage_options: Optional[Mapping[str, Any]] = None) -> RootBackend:
    """The backend of ``root``: a directory (a path, or a ``file://`` URL), else an fsspec URL.

    :raises RemoteStoreError: the URL's filesystem package is not installed (the message
        names the extra to install).
    """
    text = os.fspath(root)
    if is_url(text):
        if text.startswith("file://"):
            return PosixRoot(Path(text[len("file://"):]).expanduser())
        from .remote import FsspecRoot  # optional: fsspec (and s3fs, ...) load only for a URL root

        options: Dict[str, Any] = dict(storage_options or {})
        return FsspecRoot(text, options)
    if storage_options:
        raise TypeError("storage_options= is for URL roots (s3://..., gs://...), not a directory")
    return PosixRoot(Path(text).expanduser())


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or under it (symlinks resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


__all__ = ["PosixRoot", "RootBackend", "RootLike", "inside", "is_url", "open_root"]
