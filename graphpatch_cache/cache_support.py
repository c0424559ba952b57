"""File digests for source validation, shared by extraction (records them) and the cache
(re-checks them on a hit). Pure functions over the filesystem and ``sys.modules``."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from typing import Dict, Optional, Tuple

_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def module_file_digest(path: str) -> Optional[str]:
    """sha256 of a file, memoized by (path, mtime, size); None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_mtime_ns, st.st_size)
    digest = _DIGESTS.get(key)
    if digest is None:
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return None
        _DIGESTS[key] = digest
    return digest


def module_name_for_file(path: str) -> Optional[str]:
    """The name of the imported module whose file is ``path`` (None for ``<string>`` code)."""
    real = os.path.realpath(path)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and os.path.realpath(file) == real:
            return name
    return None


def current_module_digest(name: str) -> Optional[str]:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        path = getattr(spec, "origin", None) if spec is not None else None
    return module_file_digest(path) if path else None


def sources_unchanged(sources: Dict[str, str]) -> bool:
    """Whether every recorded module file still has the recorded digest."""
    return all(current_module_digest(name) == digest for name, digest in sources.items())


__all__ = ["current_module_digest", "module_file_digest", "module_name_for_file", "sources_unchanged"]
