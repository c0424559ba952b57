"""The error for a node path that names nothing: close matches, and where the path runs into
an opaque module (its inner ops are not nodes), that module and what can be patched instead."""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import NodePathError, close_matches


def unknown_path(full: str, known: Iterable[str], reached: Any) -> NodePathError:
    """``full`` names no node of the tree whose paths are ``known``; ``reached`` is the deepest
    graph node on its way (a :class:`~graphpatch_cache.runtime.node_path.NodePath`)."""
    graph = getattr(reached, "_np_graph", None)
    if graph is not None and graph.kind == "opaque":
        where = str(reached) or "<root>"
        inside = [str(c) for c in reached._np_children.values()]
        return NodePathError(
            f"no node at path {full!r}: {where} ({graph.module_class.rpartition('.')[2]}) is an opaque module, "
            "so the ops inside it are not nodes (it could not be compiled, or was asked to stay opaque)",
            node_path=full,
            suggestions=close_matches(full, inside),
            hint=f"patch what the opaque module exposes: {', '.join(inside[:8]) or 'its output'}; "
                 "ExtractionOptions(warn_on_compilation_failure=True) says why a module stays opaque",
        )
    suggestions = close_matches(full, known)
    return NodePathError(f"no node at path {full!r}", node_path=full, suggestions=suggestions,
                         hint="close matches: " + ", ".join(suggestions or ["(none)"]))


def patched_but_missing(path: str) -> NodePathError:
    """A patched node that the graph of this call's signature lacks."""
    return NodePathError(
        f"node {path!r} is patched, but the graph for this call's signature has no such node "
        f"(it exists in the graph of another call signature)",
        node_path=path,
        hint="patch only nodes of the graph this call uses (look at pg.graph_for(...)), or call "
        "with inputs of the signature whose graph has the node",
    )


__all__ = ["patched_but_missing", "unknown_path"]
