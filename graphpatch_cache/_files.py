"""Small file helpers shared by the runtime (``pg.save``) and the CLI (``export``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Union


def write_atomic(dest: Union[str, "os.PathLike[str]"], data: bytes) -> None:
    """Write ``data`` to a temp file beside ``dest``, fsync it, rename it over ``dest``: a
    reader sees the old file or the whole new one, never half of it."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


__all__ = ["write_atomic"]
