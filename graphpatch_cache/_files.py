"""The one atomic-write helper, shared by the cache store, the runtime (``pg.save``) and the
CLI (``export``)."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Optional, Union


def write_atomic(
    dest: Union[str, "os.PathLike[str]"],
    data: bytes,
    *,
    tmp_dir: Optional[Path] = None,
    mode: Optional[int] = None,
    sync_dir: bool = False,
) -> None:
    """Write ``data`` to a temp file, fsync it, rename it over ``dest``: a reader sees the old
    file or the whole new one, never half of it. A failed write leaves no temp file behind.

    :param tmp_dir: where the temp file goes (default: beside ``dest``); it must be on the
        same filesystem as ``dest`` so the rename is atomic (the store's ``tmp/``).
    :param mode: ``chmod`` the temp file to this before the rename (a shared cache root's
        group-writable ``0o664``).
    :param sync_dir: also fsync ``dest``'s directory, so the rename itself is durable.
    """
    dest = Path(dest)
    folder = Path(tmp_dir) if tmp_dir is not None else dest.parent
    tmp = folder / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        with contextlib.suppress(OSError):
            fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


__all__ = ["write_atomic"]
