"""Compatibility layers: modules that offer another library's names on top of this one.

- :mod:`graphpatch_cache.compat.graphpatch`: graphpatch 0.2.3's public names, so that
  ``from graphpatch import PatchableGraph, ProbePatch`` becomes
  ``from graphpatch_cache.compat.graphpatch import PatchableGraph, ProbePatch``.
"""

from __future__ import annotations

__all__: list[str] = []
