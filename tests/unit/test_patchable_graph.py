"""The library's errors share one base class (PatchableGraph on graphs:
tests/integration/test_patchable_graph.py)."""

from __future__ import annotations


import graphpatch_cache.errors as errors_mod
from graphpatch_cache.errors import (
    GraphPatchCacheError,
    SignatureMismatchError,
)


def test_all_library_errors_derive_from_base():
    classes = [getattr(errors_mod, n) for n in errors_mod.__all__ if isinstance(getattr(errors_mod, n), type)
               and not issubclass(getattr(errors_mod, n), Warning)]  # warnings (NewVariantWarning) are not errors
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, GraphPatchCacheError), cls
    assert issubclass(SignatureMismatchError, GraphPatchCacheError)
