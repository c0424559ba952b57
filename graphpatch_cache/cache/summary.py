"""What an artifact holds, read without a model: counts, the parameters' dtype, and whether
its node-path tree builds (what ``show`` and patching need). The CLI's ``build``, ``ls``,
``show`` and ``verify`` print these."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from ..artifact.format import parse_json
from ..errors import ArtifactFormatError
from .records import CacheEntry
from .store import CacheStore

if TYPE_CHECKING:  # deferred below: `ls` runs without torch
    from ..artifact import GraphArtifact
    from ..runtime import NodePath


def model_dtype(structure: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """(the parameters' dtype, ``"8bit"`` or ``None``) from an artifact's recorded structure
    (``extraction.structure``)."""
    counts = Counter(t[3] for t in structure.get("tensors", []) if t[0] == "param")
    quantization = "8bit" if counts.get("torch.int8") else None
    floats = [(n, d) for d, n in counts.items() if d != "torch.int8"]
    dtype = max(floats)[1].removeprefix("torch.") if floats else None
    return dtype, quantization


def artifact_summary(artifact: Union[GraphArtifact, Dict[str, Any]]) -> Dict[str, Any]:
    """Counts and dtype of an artifact (or of its decoded JSON payload): ``graphs`` (module
    graphs), ``nodes`` (in all graphs), ``modules`` (in the model, None when not recorded),
    ``dtype`` and ``quantization`` (see :func:`model_dtype`)."""
    data = artifact if isinstance(artifact, dict) else artifact.to_dict()
    graphs = nodes = 0
    stack: List[Dict[str, Any]] = [data["root"]]
    while stack:
        graph = stack.pop()
        graphs += 1
        nodes += len(graph["nodes"])
        stack.extend(graph["children"])
    structure = data.get("extraction", {}).get("structure") or {}
    dtype, quantization = model_dtype(structure)
    return {"graphs": graphs, "nodes": nodes, "modules": len(structure.get("modules", [])) or None,
            "dtype": dtype, "quantization": quantization}


def entry_dtype(store: CacheStore, entry: CacheEntry) -> Tuple[bool, Optional[str], Optional[str]]:
    """(whether the entry's blob is intact, its parameters' dtype, its quantization), from the
    shared root's verified blob without the full loader checks (``verify`` makes those).
    Changes nothing on disk: listing never quarantines (``verify`` then reports what it saw)."""
    data, _why = store._read_shared(entry.digest)
    if data is None:
        return False, None, None
    try:
        payload = parse_json(data, str(store._blob_path(entry.digest)))
        structure = payload.get("extraction", {}).get("structure") or {}
        dtype, quantization = model_dtype(structure)
    except (ArtifactFormatError, AttributeError, TypeError, IndexError, ValueError):
        return True, None, None  # intact bytes, not a readable artifact: `verify` reports it
    return True, dtype, quantization


def check_node_tree(artifact: GraphArtifact) -> None:
    """The node-path tree builds (what ``show`` and patching need), beyond what the loader's
    :func:`~graphpatch_cache.trust.validate.read_artifact` already checked; a check for
    :meth:`CacheStore.check`'s ``rebuild_check``.

    :raises GraphPatchCacheError: naming the node.
    """
    from ..runtime import NodePath  # deferred: imports torch

    NodePath.from_graph(artifact.root)


def node_tree(artifact: GraphArtifact) -> NodePath:
    """The artifact's node-path tree (paths as ``pg.graph`` has them), without a model."""
    from ..runtime import NodePath  # deferred: imports torch

    return NodePath.from_graph(artifact.root)


__all__ = ["artifact_summary", "check_node_tree", "entry_dtype", "model_dtype", "node_tree"]
