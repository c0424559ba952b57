"""graphpatch's public names (its 0.2.3 ``graphpatch/__init__.py``), backed by this library.

Switching is a one-line change::

    from graphpatch import PatchableGraph, ProbePatch, ExtractionOptions            # before
    from graphpatch_cache.compat.graphpatch import PatchableGraph, ProbePatch, ExtractionOptions

Every name that exists here is this library's own class (not a wrapper), so objects made
through either import are the same types. graphpatch's extraction classes
(``CompiledGraphModule``, ``OpaqueGraphModule``, ``MultiplyInvokedModule``) describe its
internal ``pg._graph_module`` tree, which this library does not build; they are importable,
so imports keep working, but using one (``isinstance``, ``issubclass``, a call) raises
:class:`~graphpatch_cache.errors.NoEquivalentError` naming what to use instead, rather than
silently answering False.

What still differs from graphpatch is listed in the README ("Coming from graphpatch").
"""

from __future__ import annotations

from typing import Any, NoReturn

from ..errors import NoEquivalentError
from ..options import ExtractionOptions
from ..patches import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from ..compose import PatchableGraph

_KIND_HINT = (
    "a module graph's kind is data here: {g.module_path: g.kind for g in pg.artifact.root.walk()} "
    "gives 'compiled' or 'opaque' for each module call"
)

_REPLACEMENTS = {
    "CompiledGraphModule": _KIND_HINT,
    "OpaqueGraphModule": _KIND_HINT,
    "MultiplyInvokedModule": (
        "a module called N times has one graph per call, named like the module with _0 ... _N-1 "
        "(pg.graph.layer_0, pg.graph.layer_1), and g.call_index in pg.artifact.root.walk() says which call"
    ),
}


class _NoEquivalent(type):
    """Metaclass of graphpatch names without an equivalent: every use raises."""

    def _refuse(cls, use: str) -> NoReturn:
        raise NoEquivalentError(
            f"graphpatch's {cls.__name__} has no equivalent in graphpatch_cache ({use}): this library "
            "binds graphs to the model without graphpatch's pg._graph_module tree",
            name=cls.__name__,
            hint=_REPLACEMENTS[cls.__name__],
        )

    def __instancecheck__(cls, instance: Any) -> bool:
        cls._refuse(f"isinstance(..., {cls.__name__})")

    def __subclasscheck__(cls, subclass: Any) -> bool:
        cls._refuse(f"issubclass(..., {cls.__name__})")

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        cls._refuse(f"{cls.__name__}(...)")


class CompiledGraphModule(metaclass=_NoEquivalent):
    """graphpatch's GraphModule of a compiled submodule; no equivalent (see the module docs)."""


class OpaqueGraphModule(metaclass=_NoEquivalent):
    """graphpatch's wrapper of a submodule that did not compile; no equivalent (see the module docs)."""


class MultiplyInvokedModule(metaclass=_NoEquivalent):
    """graphpatch's container of a submodule's several calls; no equivalent (see the module docs)."""


__all__ = [
    "AddPatch",
    "CompiledGraphModule",
    "CustomPatch",
    "MultiplyInvokedModule",
    "OpaqueGraphModule",
    "Patch",
    "ProbePatch",
    "RecordPatch",
    "ReplacePatch",
    "ZeroPatch",
    "ExtractionOptions",
    "PatchableGraph",
]
