"""The loader's trust boundary: bytes from a shared cache or a portable file -> a checked artifact.

Every door through which an artifact enters a process (a cache blob, ``PatchableGraph.load``,
``graphpatch-cache import``/``verify``) goes through :func:`read_artifact` or
:func:`read_portable`: JSON parse, JSON Schema, then :func:`check_artifact`, the static
rules that need no model (closed allowlist of call targets and Tensor methods, argument
rules, structure, bounds). Binding (:mod:`graphpatch_cache.runtime.bind`) adds the checks that
need the live model. Results are memoized per sha256 of the bytes, so a hit pays once per
blob and process.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Tuple

from .artifact import GraphArtifact, artifact_from_bytes, portable_from_bytes
from .errors import ArtifactFormatError, GraphPatchCacheError
from .targets import check_method, resolve_target

_CHECKED: Dict[str, GraphArtifact] = {}


def check_artifact(artifact: GraphArtifact, *, path: str = "") -> None:
    """Refuse anything a loader must not bind (see ``cache_schema/SPEC.md``, "Trust").

    :raises DisallowedTargetError: a node names a target, method, attribute or value outside
        the allowlist and its argument rules; the error names the node path and the target.
    :raises ArtifactFormatError: the graphs are malformed (references, arity, bounds).
    """
    for graph, graph_path in _graphs(artifact.root):
        for node in graph.nodes:
            where = f"{graph_path}.{node.name}" if graph_path else node.name
            if node.op == "call_function":
                resolve_target(node.target, node_path=where)
            elif node.op == "call_method":
                check_method(node.target, node_path=where)


def _graphs(root) -> List[Tuple[object, str]]:
    out, stack = [], [(root, "")]
    while stack:
        graph, path = stack.pop()
        out.append((graph, path))
        stack.extend((c, f"{path}.{c.name}" if path else c.name) for c in graph.children)
    return out


def read_artifact(data: bytes, path: str) -> GraphArtifact:
    """Parse, schema-validate and check one artifact (a cache blob).

    :raises ArtifactFormatError: not an artifact, malformed, or an unsupported version.
    :raises DisallowedTargetError: the graphs name something outside the allowlist.
    """
    digest = hashlib.sha256(data).hexdigest()
    artifact = _CHECKED.get(digest)
    if artifact is None:
        artifact = _guarded(lambda: artifact_from_bytes(data, path), path)
        check_artifact(artifact, path=path)
        _CHECKED[digest] = artifact
    return artifact


def read_portable(data: bytes, path: str) -> List[GraphArtifact]:
    """Parse and check every artifact of a portable file (``pg.save``/``export``)."""
    artifacts = _guarded(lambda: portable_from_bytes(data, path), path)
    for artifact in artifacts:
        check_artifact(artifact, path=path)
    return artifacts


def _guarded(parse, path: str):
    """Parsing hostile JSON must end in a typed error, never a RecursionError/MemoryError."""
    try:
        return parse()
    except GraphPatchCacheError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise ArtifactFormatError(f"{path} is not a well-formed graph artifact ({type(exc).__name__}: {exc!s:.200})",
                                  path=path, hint="the file is damaged or not written by graphpatch-cache") from exc


__all__ = ["check_artifact", "read_artifact", "read_portable"]
