"""File digests for source validation, shared by extraction (records them) and the cache
(re-checks them on a hit). Pure functions over the filesystem and ``sys.modules``.

A cache hit re-checks the files an artifact says were traced (``extraction.sources``:
module name -> sha256 of its file). Those names come from the artifact, so from whoever
could write the shared root: looking them up must never import anything. A module already
imported is found in ``sys.modules``; any other is located by
:class:`importlib.machinery.PathFinder` below its longest imported ancestor (``PathFinder``
only lists directories and stats files, it runs no package code). A name that is not a
dotted identifier, names a dunder, or cannot be located this way counts as changed: the
entry is a miss and the graph is extracted anew, never an import.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import keyword
import os
import sys
from typing import Dict, Optional, Tuple

_DIGESTS: Dict[Tuple[str, int, int], str] = {}

#: longer recorded names are refused outright (a module name is never this long)
_MAX_NAME = 512


def module_file_digest(path: str) -> Optional[str]:
    """sha256 of a file, memoized by (path, mtime, size); None if unreadable."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
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


def _valid_module_name(name: object) -> bool:
    """A dotted name of plain identifiers: no dunders, keywords, empty or relative parts."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        return False
    return all(part.isidentifier() and not keyword.iskeyword(part) and "__" not in part
               for part in name.split("."))


def _file_of_loaded(name: str) -> Optional[str]:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None) if module is not None else None
    return file if isinstance(file, str) else None


def locate_module_file(name: str) -> Optional[str]:
    """The file of module ``name`` without importing anything (see the module docstring);
    None when it cannot be located that way."""
    if not isinstance(name, str):
        return None
    if name in sys.modules:  # a lookup in a dict: whatever the name, nothing runs
        return _file_of_loaded(name)
    if not _valid_module_name(name):
        return None
    parts = name.split(".")
    # the longest ancestor that is already imported gives the search path for the rest
    start, search_path = 0, None
    for i in range(len(parts) - 1, 0, -1):
        parent = sys.modules.get(".".join(parts[:i]))
        if parent is not None:
            path = getattr(parent, "__path__", None)
            if path is None:
                return None  # the parent is a plain module: it has no submodules on disk
            start, search_path = i, list(path)
            break
    spec = None
    for i in range(start, len(parts)):
        if i > start:
            if spec is None or not spec.submodule_search_locations:
                return None
            search_path = list(spec.submodule_search_locations)
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search_path)
        except (ImportError, ValueError, OSError):
            return None
        if spec is None:
            return None
    origin = getattr(spec, "origin", None)
    return origin if isinstance(origin, str) and getattr(spec, "has_location", False) else None


def current_module_digest(name: str) -> Optional[str]:
    """sha256 of the file module ``name`` has (or would load from); never imports it."""
    path = locate_module_file(name)
    return module_file_digest(path) if path else None


def sources_unchanged(sources: Dict[str, str]) -> bool:
    """Whether every recorded module file still has the recorded digest (nothing is imported;
    a name that cannot be located counts as changed)."""
    if not isinstance(sources, dict):
        return False
    return all(current_module_digest(name) == digest for name, digest in sources.items())


__all__ = ["current_module_digest", "locate_module_file", "module_file_digest", "module_name_for_file",
           "sources_unchanged"]
