"""Package faces that import their parts on first use.

``import graphpatch_cache`` (or ``graphpatch_cache.cache``) must not import torch by itself:
the command line answers ``--help``, ``ls``, ``rm`` and ``gc`` without it. A face lists its
names and where each lives; :func:`exports` gives it the module ``__getattr__`` and
``__dir__`` (PEP 562) that import a part when one of its names is first read.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple


def exports(package: str, namespace: Dict[str, Any], parts: Mapping[str, Sequence[str]]
            ) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``parts`` maps a module (relative, like
    ``".store"``) to the names the face re-exports from it."""
    where = {name: module for module, names in parts.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later reads skip this function
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__


__all__ = ["exports"]
