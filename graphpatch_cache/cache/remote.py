"""A store root on object storage: any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``az://``,
``memory://``), through the optional extra (``pip install graphpatch-cache[s3]`` brings s3fs).

Why the store's guarantees hold here by construction:

- an object store's PUT is atomic: a reader sees no object or the whole one, and a client
  killed mid-upload leaves nothing (a multipart upload that never completes is not an object);
- a blob is created with a conditional write where the backend has one (S3 ``If-None-Match:
  *``, through fsspec's ``pipe_file(mode="create")``): the first complete upload of a digest
  stays, later writers are refused. Where the backend has none, the blob is checked for, then
  written: two writers of one name write identical bytes (its name is their sha256), so the
  last writer wins harmlessly;
- refs are written after their blob, and every blob read is digest-verified by the store.

Credentials and endpoints come the backend's usual way (environment such as
``AWS_ENDPOINT_URL_S3``, config files, or ``CacheStore(url, storage_options=...)``).
There are no locks on object storage. A root that cannot be reached raises
:class:`~graphpatch_cache.errors.RemoteStoreError`, and for a short while after that every
call fails at once instead of waiting on the network again (offline use: :mod:`.offline`).
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar

from ..errors import RemoteStoreError
from .backend import RootBackend

T = TypeVar("T")

#: after a root could not be reached, calls fail at once for this many seconds
DOWN_SECONDS = 30.0

#: what to install for a URL scheme whose fsspec filesystem is missing
_PACKAGES = {"s3": "graphpatch-cache[s3] (it brings s3fs)", "s3a": "graphpatch-cache[s3] (it brings s3fs)",
             "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}

#: root URL -> (until when it counts as unreachable, why): shared by every store of the process
_DOWN: Dict[str, Tuple[float, str]] = {}

_HINT = ("check the network and the endpoint (for S3: AWS_ENDPOINT_URL_S3, or "
         "storage_options={'client_kwargs': {'endpoint_url': ...}}) and the credentials")


class FsspecRoot(RootBackend):
    """A root at an fsspec URL. The filesystem object is made on first use, and again in a
    forked child (an fsspec filesystem's event loop and connections do not survive a fork)."""

    remote = True
    root: str

    def __init__(self, url: str, storage_options: Dict[str, Any]) -> None:
        import fsspec  # optional: only URL roots need it (the command line lists a local root without it)

        self.root = url.rstrip("/")
        self.protocol = url.split("://", 1)[0].lower()
        self._options = storage_options
        try:
            cls = fsspec.get_filesystem_class(self.protocol)
        except (ImportError, ValueError) as exc:
            package = _PACKAGES.get(self.protocol, f"the fsspec filesystem package for {self.protocol}://")
            raise RemoteStoreError(f"cannot open the cache at {self.root}: {exc}", path=self.root,
                                   hint=f"pip install {package}") from exc
        self._base = str(cls._strip_protocol(self.root)).rstrip("/")
        self._cls = cls
        self._fs: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self.conditional = True  # until the backend shows it has no conditional create

    # -- the filesystem and its errors ------------------------------------------------------------
    @property
    def fs(self) -> Any:
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                self._fs = self._cls(**self._options)  # fsspec's instance cache: warm connections, per process
                self._pid = os.getpid()
            return self._fs

    def _path(self, name: str) -> str:
        return f"{self._base}/{name}" if name else self._base

    def location(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def _call(self, what: str, fn: Callable[[], T], keep: Tuple[Type[BaseException], ...] = ()) -> T:
        """``fn()``, its failures as the store reads them: a name that is not there
        (``FileNotFoundError``) or already is (``FileExistsError``) as they are, the types in
        ``keep`` as they are, anything else as :class:`RemoteStoreError` (a fact about the
        root, never about one object: the loader must not quarantine a ref the service
        failed to serve). A connection or credential failure also marks the root
        unreachable for :data:`DOWN_SECONDS`."""
        why = self.down()
        if why is not None:
            raise RemoteStoreError(f"the cache at {self.root} cannot be reached ({why})", path=self.root, hint=_HINT)
        try:
            return fn()
        except (FileNotFoundError, FileExistsError):
            raise
        except keep:
            raise
        except OSError as exc:  # refused (denied, throttled, a server error): the root is there
            raise RemoteStoreError(f"the cache at {self.root} refused a {what} ({type(exc).__name__}: {exc})",
                                   path=self.root, hint=_HINT) from exc
        except Exception as exc:  # the backend's connection and credential errors (botocore, aiohttp, ...)
            why = f"{type(exc).__name__}: {exc}"
            _DOWN[self.root] = (time.monotonic() + DOWN_SECONDS, why)
            raise RemoteStoreError(f"the cache at {self.root} cannot be reached ({what}: {why})",
                                   path=self.root, hint=_HINT) from exc

    # -- the operations ---------------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        path = self._path(name)
        fs = self.fs
        # s3fs asks for the size first (a HEAD) to split big reads; one GET is what a ref needs
        kwargs = {"max_concurrency": 1} if "max_concurrency" in inspect.signature(fs.cat_file).parameters else {}
        return bytes(self._call("read", lambda: fs.cat_file(path, **kwargs)))

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        self._call("write", lambda: self.fs.pipe_file(path, data))

    def create(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        if self.conditional:
            try:
                self._call("write", lambda: self.fs.pipe_file(path, data, mode="create"),
                           keep=(TypeError, NotImplementedError, ValueError))
                return True
            except FileExistsError:
                return False
            except (TypeError, NotImplementedError, ValueError):
                self.conditional = False  # this backend has no conditional create: check, then write
            except RemoteStoreError:
                # a conditional write that lost a race still in flight (S3 answers 409): the
                # other writer's object, when it lands, has these very bytes
                if self.down() is None and self.exists(name):
                    return False
                raise
        if self.exists(name):
            return False
        self.write(name, data)
        return True

    def exists(self, name: str) -> bool:
        path = self._path(name)
        fs = self.fs

        def probe() -> bool:
            fs.invalidate_cache(path)  # another process may have written it since we last looked
            return bool(fs.exists(path))

        return self._call("exists", probe)

    def list(self, folder: str) -> List[str]:
        path = self._path(folder)
        fs = self.fs

        def names() -> List[str]:
            fs.invalidate_cache(path)  # never a listing cached before other processes wrote
            try:
                found = fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in found} - {""})

        return self._call("list", names)

    def size(self, name: str) -> int:
        path = self._path(name)
        return int(self._call("size", lambda: self.fs.size(path)))

    def delete(self, name: str) -> None:
        path = self._path(name)
        self._call("delete", lambda: self.fs.rm_file(path))

    def move(self, name: str, dest: str) -> None:
        src, dst = self._path(name), self._path(dest)

        def copy_then_delete() -> None:  # object stores move by copying
            self.fs.copy(src, dst)
            self.fs.rm_file(src)

        self._call("move", copy_then_delete)

    def down(self) -> Optional[str]:
        """Why the root was unreachable a moment ago, or ``None``."""
        until, why = _DOWN.get(self.root, (0.0, ""))
        return why if time.monotonic() < until else None


__all__ = ["DOWN_SECONDS", "FsspecRoot"]
