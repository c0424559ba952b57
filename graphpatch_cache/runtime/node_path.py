"""Node paths: the names users type to reach a value (``transformer.h_17.mlp.act.mul_3``).

A :class:`NodePath` tree is built from artifact data alone, so it can be shown without
binding a model. Module graphs are inner nodes; values (inputs, parameters, op results and
``output``) are leaves, and a value with a nested structure (a tuple, a dict, a
ModelOutput) has its parts as children: ``pg.graph.output.logits`` is ``"output|logits"``.

How a path string resolves (:meth:`NodePath._np_find`), first match wins:

1. dotted names walk module graphs to a node: ``transformer.h_0.mlp.act.mul_3``;
2. ``|`` (or, as graphpatch writes nested parts, ``.`` after the node) walks into the parts
   the node's recorded structure has: ``output|sub_1|sub_0`` = ``output|sub_1.sub_0``;
3. a module's inputs by where they sit in its forward's signature, as graphpatch names them,
   where that name is free: ``input`` for the placeholder ``input_`` (a builtin's name is
   escaped in graphs), ``foos|sub_1`` for the second of ``*foos``, ``bars|a`` for ``a`` of
   ``**bars``, ``past|sub_0|sub_1`` for a leaf of a nested argument. These are aliases: the
   node keeps its own name (``str()`` gives it), and a real node or part of that name wins;
4. a value whose structure was not recorded (no metadata, or an object such as a cache)
   takes any ``|`` parts unchecked; they are checked when the patch runs.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, cast

from ..artifact import ModuleGraph, NodeData
from ..errors import NodePathError, NotAValueError, close_matches
from .node_html import HtmlView
from .path_errors import unknown_path
from .shapes import InputBinder, ShapeScope, describe_meta, scope_of, shape_from_meta
from .size_names import legend_for
from ..artifact.names import join_path

SUBPATH_SEP = "|"
_HIDDEN_NODES = {"_graphpatch_module"}
_MAX_LOCATION = 32


class CodeText(str):
    """A ``str`` that shows as the code it holds (in a notebook, ``node._code`` prints as
    code rather than as one escaped line)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


def _part_key(segment: str) -> Any:
    """``sub_3`` -> 3 (a sequence index); anything else is a mapping key or attribute name."""
    return int(segment[4:]) if segment.startswith("sub_") and segment[4:].isdigit() else segment


def _segment(key: Any) -> str:
    return f"sub_{key}" if isinstance(key, int) else str(key)


def _location(meta: Dict[str, Any]) -> Optional[Tuple[str, Tuple[Any, ...]]]:
    """A placeholder's place in its forward's signature, ``(parameter, keys)``, if recorded
    and well-formed (the artifact may come from a shared store: never trust its shape)."""
    loc = meta.get("input")
    if not isinstance(loc, list) or not 0 < len(loc) <= _MAX_LOCATION or not isinstance(loc[0], str):
        return None
    if not loc[0].isidentifier() or not all(
            (type(k) is int and k >= 0) or (isinstance(k, str) and 0 < len(k) <= 200) for k in loc[1:]):
        return None
    return loc[0], tuple(_part_key(k) if isinstance(k, str) else k for k in loc[1:])


class NodePath(HtmlView):
    """One module graph, value, or part of a nested value in a PatchableGraph.

    Attribute access walks the tree (``pg.graph.transformer.h_0``, ``pg.graph.output.sub_1``);
    ``pg.graph["a.b|sub_0"]`` does the same from a string (see the module docstring for the
    rules). ``str()`` gives the path to pass to :meth:`PatchableGraph.patch`; the NodePath
    itself is accepted there too.

    ``_code`` is a module's generated code or a value's source line, as a ``str`` that shows
    as code. ``_shape`` is a value's recorded shape: a ``torch.Size`` when every dim is
    concrete, a :class:`~graphpatch_cache.runtime.shapes.SymbolicShape` when some are
    symbolic, a structure of those for a nested value, a type name for a non-tensor value,
    and ``None`` for a module graph (see :mod:`graphpatch_cache.runtime.shapes`).
    """

    def __init__(
        self,
        path: str,
        *,
        graph: Optional[ModuleGraph] = None,
        node: Optional[NodeData] = None,
        index: Optional[Dict[str, "NodePath"]] = None,
        scope: Optional[ShapeScope] = None,
        graph_path: str = "",
        keys: Tuple[Any, ...] = (),
        meta: Optional[Dict[str, Any]] = None,
        register: bool = True,
    ) -> None:
        self._np_path = path
        self._np_graph = graph
        self._np_node = node
        self._np_keys = keys
        self._np_meta: Dict[str, Any] = meta if meta is not None else (node.meta if node is not None else {})
        self._np_graph_path = graph_path  # for a value: the path of the graph that holds its node
        self._np_children: Dict[str, NodePath] = {}
        self._np_alias_name = ""  # for an input: its name by place in the signature, if it has one
        self._np_aliases: Dict[Tuple[str, Tuple[Any, ...]], NodePath] = {}
        self._np_index = index if index is not None else {}
        if register:
            self._np_index.setdefault(path, self)
        if graph is not None and graph.call_signature is not None and path:
            # graphs an opaque module calls are traced on their own: their size symbols are theirs
            scope = scope_of(graph, None, f"graph {path!r} was traced on its own, for a call its opaque parent makes")
        self._np_scope = scope
        if graph is not None:
            self._np_build_graph(graph)
        elif isinstance(self._np_meta, dict):
            self._np_build_parts()

    def _np_build_graph(self, graph: ModuleGraph) -> None:
        path = self._np_path
        children = {c.name: c for c in graph.children}
        placeholders: List[NodePath] = []
        for nd in graph.nodes:
            if nd.name in _HIDDEN_NODES:
                continue
            child_path = f"{path}.{nd.name}" if path else nd.name
            if nd.op == "call_module" and nd.target in children:
                self._np_children[nd.name] = NodePath(
                    child_path, graph=children.pop(nd.target), index=self._np_index, scope=self._np_scope)
            else:
                child = NodePath(child_path, node=nd, index=self._np_index, scope=self._np_scope, graph_path=path)
                self._np_children[nd.name] = child
                if nd.op == "placeholder":
                    placeholders.append(child)
        for name, sub in children.items():  # graphs an opaque module calls itself
            child_path = join_path(path, name)
            self._np_children[name] = NodePath(child_path, graph=sub, index=self._np_index, scope=self._np_scope)
        for ph in placeholders:
            loc = _location(ph._np_meta)
            if loc is None or ph._np_node is None or loc == (ph._np_node.name, ()):
                continue
            param, keys = loc
            taken = self._np_children.get(param)
            if taken is not None and (not keys or taken._np_node is None or taken._np_node.op != "placeholder"):
                continue  # the name is taken by a node (whose parts win): no alias
            alias = SUBPATH_SEP.join([param] + [_segment(k) for k in keys])
            if self._np_aliases.setdefault(loc, ph) is ph:
                ph._np_alias_name = alias
            self._np_index.setdefault(join_path(path, alias), ph)

    def _np_build_parts(self) -> None:
        meta = self._np_meta
        parts: List[Tuple[str, Any, Any]]
        if isinstance(meta.get("items"), list):
            parts = [(f"sub_{i}", i, m) for i, m in enumerate(meta["items"])]
        elif isinstance(meta.get("fields"), dict):
            parts = [(k, k, m) for k, m in meta["fields"].items() if isinstance(k, str)]
        else:
            return
        for name, key, sub_meta in parts:
            self._np_children[name] = NodePath(
                f"{self._np_path}{SUBPATH_SEP}{name}", node=self._np_node, index=self._np_index,
                scope=self._np_scope, graph_path=self._np_graph_path, keys=self._np_keys + (key,),
                meta=sub_meta if isinstance(sub_meta, dict) else {})

    @classmethod
    def from_graph(cls, root: ModuleGraph, binder: Optional[InputBinder] = None) -> "NodePath":
        """The tree of ``root``; ``binder`` maps a call's inputs to the root graph's input
        tensors (for :meth:`SymbolicShape.at <graphpatch_cache.runtime.shapes.SymbolicShape.at>`)."""
        return cls("", graph=root, scope=scope_of(root, binder, "no model is bound to these graphs"))

    # -- tree access -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> "NodePath":
        if name.startswith("_np_") or name.startswith("__"):
            raise AttributeError(name)
        children = self.__dict__.get("_np_children", {})
        if name in children:
            return cast(NodePath, children[name])
        alias = self.__dict__.get("_np_aliases", {}).get((name, ()))
        if alias is not None:
            return cast(NodePath, alias)
        where = self._np_path or "<root>"
        if self._np_graph is None and not children:
            raise AttributeError(f"{where} is a value with no parts; it has no child {name!r}")
        raise AttributeError(
            f"{where} has no child {name!r}; close matches: {close_matches(name, children) or sorted(children)[:10]}"
        )

    def __getitem__(self, path: Any) -> "NodePath":
        """``graph["a.b"]``: a path relative to this graph; ``value["logits"]``,
        ``value[0]``: a part of this value."""
        if isinstance(path, NodePath):
            path = str(path)
        if self._np_graph is None:
            if isinstance(path, int) and not isinstance(path, bool):
                path = f"sub_{path}"
            if not isinstance(path, str):
                raise TypeError(f"a value's parts are indexed by int or str, got {type(path).__name__}")
            found, extra = self._np_walk_parts([s for s in path.lstrip(SUBPATH_SEP).split(SUBPATH_SEP) if s])
        else:
            if not isinstance(path, str):
                raise TypeError(f"node paths are str or NodePath, got {type(path).__name__}")
            found, extra = self._np_find(path)
        return found._np_unchecked(extra) if extra else found

    def __dir__(self) -> List[str]:
        aliases = [p for p, keys in self._np_aliases if not keys and p not in self._np_children]
        return list(self._np_children) + aliases + ["_code", "_shape"]

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
    def _code(self) -> CodeText:
        if self._np_graph is not None:
            return CodeText(self._np_graph.code.strip())
        source = self._np_node.meta.get("source", "") if self._np_node is not None else ""
        return CodeText(source if isinstance(source, str) else "")

    @property
    def _shape(self) -> Any:
        if self._np_graph is not None:
            return None
        return shape_from_meta(self._np_meta, self._np_scope)

    @property
    def _is_value(self) -> bool:
        return self._np_node is not None

    # -- look-up -------------------------------------------------------------------------------
    def _np_find(self, path: str) -> Tuple["NodePath", Tuple[Any, ...]]:
        """The NodePath at ``path`` (relative to this graph), and the part keys past the
        structure recorded for it (non-empty only for values whose structure is unknown).

        :raises NodePathError: no such node or part (with close matches).
        """
        base, bar, sub = str(path).partition(SUBPATH_SEP)
        comps = base.split(".") if base else []
        node = self
        i = 0
        while i < len(comps) and node._np_graph is not None:
            child = node._np_children.get(comps[i])
            if child is None:
                break
            node, i = child, i + 1
        rest = comps[i:]
        segments = rest + ([s for s in sub.split(SUBPATH_SEP)] if bar else [])
        if node._np_graph is not None:
            if not segments:
                return node, ()
            if rest:  # an input by its place in the forward's signature
                alias = node._np_alias(rest[0], segments[1:])
                if alias is not None:
                    return alias, ()
            raise self._np_unknown(path, node)
        try:
            return node._np_walk_parts(segments)
        except NodePathError:
            parent = self._np_index.get(node._np_graph_path) if node._np_keys == () else None
            if parent is not None and node._np_node is not None and node._np_node.op == "placeholder":
                alias = parent._np_alias(node._np_node.name, segments)
                if alias is not None:
                    return alias, ()
            raise

    def _np_alias(self, param: str, segments: Sequence[str]) -> Optional["NodePath"]:
        keys: List[Any] = []
        for seg in segments:
            keys.extend(_part_key(s) for s in seg.split("."))
        return self._np_aliases.get((param, tuple(keys)))

    def _np_walk_parts(self, segments: Sequence[str]) -> Tuple["NodePath", Tuple[Any, ...]]:
        node = self
        todo = [s for s in segments]
        while todo:
            seg = todo.pop(0)
            child = node._np_children.get(seg)
            if child is not None:
                node = child
                continue
            if "." in seg:  # graphpatch writes nested parts as output|sub_1.sub_0
                todo = seg.split(".") + todo
                continue
            meta = node._np_meta
            if "shape" in meta:
                raise NodePathError(
                    f"{str(node)!r} is a tensor; it has no part {seg!r}",
                    node_path=f"{node}{SUBPATH_SEP}{seg}",
                    hint="patch the tensor itself, and index it inside the patch (e.g. a slice)",
                )
            if node._np_children:
                parts = list(node._np_children)
                raise NodePathError(
                    f"{str(node)!r} ({meta.get('type', 'value')}) has no part {seg!r}; its parts: {', '.join(parts)}",
                    node_path=f"{node}{SUBPATH_SEP}{seg}",
                    suggestions=[f"{node}{SUBPATH_SEP}{p}" for p in close_matches(seg, parts) or parts[:5]],
                    hint=f"its parts are {parts}",
                )
            # no structure recorded: the parts are checked when the patch runs
            return node, tuple(_part_key(s) for s in [seg] + todo)
        return node, ()

    def _np_unchecked(self, extra: Tuple[Any, ...]) -> "NodePath":
        """A NodePath for parts of a value whose structure was not recorded."""
        path = self._np_path + "".join(f"{SUBPATH_SEP}{_segment(k)}" for k in extra)
        return NodePath(path, node=self._np_node, index=self._np_index, scope=self._np_scope,
                        graph_path=self._np_graph_path, keys=self._np_keys + extra, meta={}, register=False)

    def _np_unknown(self, path: str, reached: Optional["NodePath"] = None) -> NodePathError:
        full = f"{self._np_path}.{path}" if self._np_path and path else (path or self._np_path)
        return unknown_path(full, self._np_index, reached)

    def _np_lookup(self, path: str) -> "NodePath":
        found, extra = self._np_find(path)
        return found._np_unchecked(extra) if extra else found

    def _np_resolve_value(self, path: Any) -> Tuple[str, str, Tuple[Any, ...]]:
        """(graph path, node name, sub-path keys) of a value path.

        :raises NodePathError: unknown path or part (with close matches).
        :raises NotAValueError: the path names a module graph.
        """
        found, extra = self._np_find(str(path))
        if found._np_graph is not None:
            children = list(found._np_children)
            raise NotAValueError(
                f"{found._np_path or '<root>'!r} is a module graph, not a value; its children: "
                + ", ".join(children[:20]) + (" ..." if len(children) > 20 else ""),
                node_path=found._np_path,
                suggestions=[f"{found._np_path}.{c}" if found._np_path else c for c in children[:5]],
                hint="patch one of its values, e.g. its 'output'",
            )
        assert found._np_node is not None
        return found._np_graph_path, found._np_node.name, found._np_keys + extra

    def _np_all_paths(self) -> List[str]:
        """This path and every path below it (``h_1`` holds ``h_1.mlp``, not ``h_10``)."""
        own = self._np_path
        return sorted(p for p in self._np_index if not own or p == own or p.startswith((own + ".", own + SUBPATH_SEP)))

    # -- display ---------------------------------------------------------------------------------
    def _np_label(self) -> str:
        name = self._np_path.rpartition(".")[2] or "<root>"
        if self._np_keys:
            name = self._np_path.rpartition(SUBPATH_SEP)[2]
        if self._np_graph is not None:
            kind = " (opaque)" if self._np_graph.kind == "opaque" else ""
            return f"{name}: {self._np_graph.module_class.rpartition('.')[2]}{kind}"
        label = describe_meta(self._np_meta, getattr(self._np_scope, "names", None)) if isinstance(self._np_meta, dict) else ""
        if self._np_alias_name and not self._np_keys:
            label = f"{label} (alias: {self._np_alias_name})" if label else f"(alias: {self._np_alias_name})"
        return f"{name}: {label}" if label else name

    def _walk(self, depth: Optional[int] = None, grep: Optional[str] = None) -> Iterator[Tuple["NodePath", int, bool]]:
        """``(node, level, is_last_sibling)`` below this path, depth first, ``depth`` levels deep,
        only branches holding a path that contains ``grep``; a graph lists its nodes, a value its
        parts. ``repr`` draws this walk; ``graphpatch-cache show --json`` lists it."""
        parts = self._np_graph is None
        def walk(node: "NodePath", level: int) -> Iterator[Tuple["NodePath", int, bool]]:
            if (depth is not None and level >= depth) or (node._np_graph is None and not parts):
                return
            items = [c for c in node._np_children.values() if grep is None or any(grep in p for p in c._np_all_paths())]
            for i, child in enumerate(items):
                yield child, level, i == len(items) - 1
                yield from walk(child, level + 1)

        return walk(self, 0)

    def _tree(self, depth: Optional[int] = None, grep: Optional[str] = None) -> str:
        """The tree below this path as text (see :meth:`_walk`), the sizes it shows explained on line 2."""
        lines = [self._np_label()]
        open_levels: List[bool] = []  # per level above: whether that branch has siblings below
        walked = list(self._walk(depth, grep))
        for node, level, last in walked:
            del open_levels[level:]
            prefix = "".join("│  " if more else "   " for more in open_levels)
            lines.append(prefix + ("└─" if last else "├─") + node._np_label())
            open_levels.append(not last)
        sizes = legend_for(  # (graphs an opaque module calls have sizes of their own: not explained here)
            self._np_scope, [n._np_meta for n in [self] + [w[0] for w in walked] if n._np_scope is self._np_scope])
        lines[1:1] = [sizes] if sizes else []
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self._tree()


__all__ = ["CodeText", "NodePath", "SUBPATH_SEP"]
