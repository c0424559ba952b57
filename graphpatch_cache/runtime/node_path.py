"""Node paths: the names users type to reach a value (``transformer.h_17.mlp.act.mul_3``).

A :class:`NodePath` tree is built from artifact data alone, so it can be shown without
binding a model. Module graphs are inner nodes; values (inputs, parameters, op results and
``output``) are leaves. ``"node|key"`` addresses part of a nested value.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..artifact import ModuleGraph, NodeData
from ..errors import NodePathError, NotAValueError, close_matches

SUBPATH_SEP = "|"
_HIDDEN_NODES = {"_graphpatch_module"}


def _format_meta(meta: Dict[str, Any]) -> str:
    if "shape" in meta:
        dims = ", ".join(str(d) for d in meta["shape"])
        return f"Tensor({meta.get('dtype', '?')})[{dims}]"
    if "items" in meta:
        return f"{meta.get('type', 'tuple')}(" + ", ".join(_format_meta(m) for m in meta["items"]) + ")"
    if "fields" in meta:
        return f"{meta.get('type', 'dict')}(" + ", ".join(f"{k}={_format_meta(m)}" for k, m in meta["fields"].items()) + ")"
    return meta.get("type", "")


class NodePath:
    """One module graph or value in a PatchableGraph.

    Attribute access walks the tree (``pg.graph.transformer.h_0``); ``pg.graph["a.b"]`` does
    the same from a string. ``_code`` is a module's generated code or a value's source line;
    ``_shape`` is a value's shape (symbolic sizes by name). ``str()`` gives the path to pass
    to :meth:`PatchableGraph.patch`.
    """

    def __init__(
        self,
        path: str,
        *,
        graph: Optional[ModuleGraph] = None,
        node: Optional[NodeData] = None,
        index: Optional[Dict[str, "NodePath"]] = None,
    ) -> None:
        self._np_path = path
        self._np_graph = graph
        self._np_node = node
        self._np_children: Dict[str, NodePath] = {}
        self._np_index = index if index is not None else {}
        self._np_index[path] = self
        if graph is not None:
            children = {c.name: c for c in graph.children}
            for nd in graph.nodes:
                if nd.name in _HIDDEN_NODES:
                    continue
                child_path = f"{path}.{nd.name}" if path else nd.name
                if nd.op == "call_module" and nd.target in children:
                    self._np_children[nd.name] = NodePath(child_path, graph=children.pop(nd.target), index=self._np_index)
                else:
                    self._np_children[nd.name] = NodePath(child_path, node=nd, index=self._np_index)
            for name, child in children.items():  # graphs an opaque module calls itself
                child_path = f"{path}.{name}" if path else name
                self._np_children[name] = NodePath(child_path, graph=child, index=self._np_index)

    @classmethod
    def from_graph(cls, root: ModuleGraph) -> "NodePath":
        return cls("", graph=root)

    # -- tree access -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> "NodePath":
        if name.startswith("_np_"):
            raise AttributeError(name)
        children = self.__dict__.get("_np_children", {})
        if name in children:
            return children[name]
        where = self._np_path or "<root>"
        raise AttributeError(
            f"{where} has no child {name!r}; close matches: {close_matches(name, children) or sorted(children)[:10]}"
        )

    def __getitem__(self, path: str) -> "NodePath":
        return self._np_lookup(str(path))

    def __dir__(self) -> List[str]:
        return list(self._np_children) + ["_code", "_shape"]

    def __iter__(self) -> Iterator["NodePath"]:
        return iter(self._np_children.values())

    def __str__(self) -> str:
        return self._np_path

    def __fspath__(self) -> str:  # pragma: no cover - convenience
        return self._np_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodePath) and other._np_path == self._np_path

    def __hash__(self) -> int:
        return hash(self._np_path)

    @property
    def _code(self) -> str:
        if self._np_graph is not None:
            return self._np_graph.code
        return self._np_node.meta.get("source", "") if self._np_node is not None else ""

    @property
    def _shape(self) -> Any:
        if self._np_node is None:
            return None
        meta = self._np_node.meta
        if "shape" in meta:
            return tuple(meta["shape"])
        return _format_meta(meta) or None

    @property
    def _is_value(self) -> bool:
        return self._np_node is not None

    # -- look-up -------------------------------------------------------------------------------
    def _np_lookup(self, path: str) -> "NodePath":
        base, _, _ = path.partition(SUBPATH_SEP)
        full = f"{self._np_path}.{base}" if self._np_path and base else (base or self._np_path)
        found = self._np_index.get(full)
        if found is None:
            raise NodePathError(
                f"no node at path {full!r}",
                node_path=full,
                suggestions=close_matches(full, self._np_index),
                hint="close matches: " + ", ".join(close_matches(full, self._np_index) or ["(none)"]),
            )
        return found

    def _np_resolve_value(self, path: str) -> Tuple[str, str, Tuple[Any, ...]]:
        """(graph path, node name, sub-path keys) of a value path.

        :raises NodePathError: unknown path (with close matches).
        :raises NotAValueError: the path names a module graph.
        """
        base, _, sub = str(path).partition(SUBPATH_SEP)
        found = self._np_lookup(base)
        if found._np_node is None:
            children = list(found._np_children)
            raise NotAValueError(
                f"{found._np_path or '<root>'!r} is a module graph, not a value; its children: "
                + ", ".join(children[:20]) + (" ..." if len(children) > 20 else ""),
                node_path=found._np_path,
                suggestions=[f"{found._np_path}.{c}" if found._np_path else c for c in children[:5]],
                hint="patch one of its values, e.g. its 'output'",
            )
        keys: Tuple[Any, ...] = ()
        if sub:
            keys = tuple(int(k[4:]) if k.startswith("sub_") and k[4:].isdigit() else k for k in sub.split(SUBPATH_SEP))
        graph_path, _, node = found._np_path.rpartition(".")
        return graph_path, node, keys

    def _np_all_paths(self) -> List[str]:
        return sorted(p for p in self._np_index if p.startswith(self._np_path))

    # -- display ---------------------------------------------------------------------------------
    def _np_label(self) -> str:
        name = self._np_path.rpartition(".")[2] or "<root>"
        if self._np_graph is not None:
            kind = " (opaque)" if self._np_graph.kind == "opaque" else ""
            return f"{name}: {self._np_graph.module_class.rpartition('.')[2]}{kind}"
        return f"{name}: {_format_meta(self._np_node.meta)}" if self._np_node is not None else name

    def _tree(self, depth: Optional[int] = None, grep: Optional[str] = None) -> str:
        """The tree below this path, ``depth`` levels deep, only branches whose path
        contains ``grep``."""
        lines = [self._np_label()]

        def walk(node: "NodePath", prefix: str, level: int) -> None:
            if depth is not None and level >= depth:
                return
            items = [c for c in node._np_children.values() if grep is None or any(grep in p for p in c._np_all_paths())]
            for i, child in enumerate(items):
                last = i == len(items) - 1
                lines.append(prefix + ("└─" if last else "├─") + child._np_label())
                walk(child, prefix + ("   " if last else "│  "), level + 1)

        walk(self, "", 0)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self._tree()


__all__ = ["NodePath", "SUBPATH_SEP"]
