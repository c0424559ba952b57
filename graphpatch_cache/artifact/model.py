"""The artifact's data model: frozen dataclasses for one extraction's graphs, and the schema
version they are written under. Pure data: no tensors, no pickles, no code that is ever run."""

from __future__ import annotations

import json
import marshal
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, cast
from ..errors import GraphPatchCacheError


SCHEMA_VERSION = 1


SUPPORTED_SCHEMA_VERSIONS = (1,)


def check_schema_version(data: Any) -> int:
    """The ``schema_version`` of decoded artifact JSON, one this release reads.

    :raises GraphPatchCacheError: not an artifact (no ``schema_version``), or a version this
        release does not read.
    """
    if not isinstance(data, dict) or "schema_version" not in data:
        raise GraphPatchCacheError(
            "not a graph artifact: no schema_version field",
            hint="pass a file written by PatchableGraph.save() or the cache",
        )
    version = data["schema_version"]
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise GraphPatchCacheError(
            f"artifact schema_version {version!r} is not supported; this release reads "
            f"{list(SUPPORTED_SCHEMA_VERSIONS)}",
            hint="rebuild the artifact with this release, or upgrade graphpatch-cache",
        )
    return cast(int, version)


@dataclass(frozen=True, kw_only=True)
class NodeData:
    """One fx node. ``target`` is a qualified function name, a method name, a child graph's
    local name or a local attribute name, depending on ``op``."""

    name: str
    op: str
    target: str
    args: Any = ()
    kwargs: Any = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModuleGraph:
    """The graph of one call of one module.

    :ivar name: the local name of this graph in its parent (``""`` for the root).
    :ivar module_path: qualified name of the module in the model (``transformer.h.0``).
    :ivar kind: ``"compiled"`` (nodes are the module's ops) or ``"opaque"`` (one call of the
        original module, with patchable inputs, outputs, parameters and attributes).
    :ivar attributes: local attribute name -> qualified name of the model parameter, buffer
        or attribute it binds to.
    :ivar input_spec: for opaque graphs, the pytree spec of the forward's ``(args, kwargs)``.
    :ivar call_signature: for a graph called by an opaque module (extracted separately), the
        signature of that call (see :mod:`graphpatch_cache.artifact.signature`).
    """

    name: str
    module_path: str
    module_class: str
    kind: str
    call_index: int
    nodes: List[NodeData]
    children: List["ModuleGraph"]
    attributes: Dict[str, str] = field(default_factory=dict)
    input_spec: Optional[str] = None
    call_signature: Optional[Dict[str, Any]] = None
    code: str = ""

    def nodes_key(self) -> bytes:
        """The node list as bytes that are equal exactly when the nodes are equal *with their
        value types* (``1`` and ``True`` are equal under ``==``, not here): ``marshal`` keeps
        every type it writes and reads back what it wrote (format 2: no references between
        objects, so equal content gives equal bytes whatever objects it shares). Computed once per object; used to
        check, and to bind, a model's repeated identical graphs once. (Dicts that differ only
        in order give different bytes: such graphs are just not found to be the same.)

        :raises ValueError: node data ``marshal`` cannot write (built in memory), or that
            refers to itself or nests too deeply.
        """
        key = self.__dict__.get("_nodes_key")
        if key is None:
            try:
                key = marshal.dumps([(n.name, n.op, n.target, n.args, n.kwargs, n.meta) for n in self.nodes], 2)
            except ValueError as exc:  # (too deeply nested, or not data)
                raise ValueError(f"node data refers to itself, nests too deeply or is not data ({exc})") from exc
            object.__setattr__(self, "_nodes_key", key)  # frozen: a cache, not a field
        return cast(bytes, key)

    def walk(self) -> Iterator["ModuleGraph"]:
        """Yield this graph and all descendants, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True, kw_only=True)
class GraphArtifact:
    """Everything needed to rebuild a PatchableGraph for one input signature.

    :ivar signature: the call signature the graphs were extracted for (see
        :mod:`graphpatch_cache.artifact.signature`).
    :ivar input_spec: pytree spec (JSON) of the canonical ``(args, kwargs)`` of the root call.
    :ivar extraction: options fingerprint and the device the graphs were traced on.
    """

    schema_version: int
    model_class: str
    root: ModuleGraph
    signature: Dict[str, Any]
    input_spec: str
    extraction: Dict[str, Any]
    versions: Dict[str, str]

    def __repr__(self) -> str:  # the dataclass repr printed every node (about 700 KB for a 7B model)
        graphs = list(self.root.walk())
        dims = [leaf.get("dims", leaf.get("value")) for leaf in self.signature.get("leaves", [])]
        return (f"GraphArtifact({self.model_class.rpartition('.')[2]}, inputs {dims}, {len(graphs)} graphs, "
                f"{sum(len(g.nodes) for g in graphs)} nodes)")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "GraphArtifact":
        version = check_schema_version(data)
        try:
            return cls(
                schema_version=version,
                model_class=data["model_class"],
                root=_module_graph_from_dict(data["root"]),
                signature=data["signature"],
                input_spec=data["input_spec"],
                extraction=data["extraction"],
                versions=data["versions"],
            )
        except (KeyError, TypeError) as exc:
            raise GraphPatchCacheError(
                f"malformed graph artifact: {exc!r}", hint="the file is damaged; rebuild it"
            ) from exc


def _module_graph_from_dict(data: Dict[str, Any]) -> ModuleGraph:
    return ModuleGraph(
        name=data["name"],
        module_path=data["module_path"],
        module_class=data["module_class"],
        kind=data["kind"],
        call_index=data["call_index"],
        nodes=[NodeData(**n) for n in data["nodes"]],
        children=[_module_graph_from_dict(c) for c in data["children"]],
        attributes=dict(data.get("attributes", {})),
        input_spec=data.get("input_spec"),
        call_signature=data.get("call_signature"),
        code=data.get("code", ""),
    )


__all__ = ["SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS", "GraphArtifact", "ModuleGraph", "NodeData",
           "check_schema_version"]
