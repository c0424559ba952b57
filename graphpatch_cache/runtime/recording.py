"""Recording many values in one call: ``out, acts = pg.record(*inputs, nodes="model.layers_*.mlp.*")``.

What TransformerLens users do with ``run_with_cache`` and nnsight users with ``.save()``,
without building a patch object per node: ``nodes`` selects value nodes of the graph this
call uses, and ``acts`` maps each selected node path to its value in this call.

- ``nodes`` is a glob (``fnmatch``: ``*`` also crosses dots, so ``"model.layers_*.mlp.*"``
  holds every value inside every layer's MLP), a list of globs and exact paths, or a
  predicate ``path -> bool``. Parameters and buffers (``get_attr`` nodes) are recorded only
  when a path names them exactly: a pattern selects computed values.
- Values are recorded as the graph continues with them: after the patches of the
  ``pg.patch`` blocks around the call. Tensors are detached. They are the graph's own
  tensors (no copy, like TransformerLens's cache) unless one of the graphs of this call
  writes into a tensor in place (or calls a module's own code, which may): then every
  recorded tensor is a copy, so that each holds the value the node had.
- A glob or path that selects nothing raises :class:`~graphpatch_cache.errors.NodePathError`
  with close matches.

The selection and its recording slots are made once per graph variant and selection, and
reused by later calls (the slot code too: see :mod:`.patching`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch

from ..errors import NodePathError, close_matches
from ..patches import Patch, _detached_copy, _map_tensors
from .node_path import NodePath
from .patch_stack import StackEntry, Variant, leave
from .patching import SlotKey

#: what ``pg.record(nodes=...)`` takes
NodeSelector = Union[str, Sequence[str], Callable[[str], bool]]


@dataclass(kw_only=True)
class Recorder(Patch[Any]):
    """The patch a recording slot runs: puts the value into ``store`` under ``path``."""

    requires_clone: bool = False  # never writes into its input
    store: Dict[str, Any] = field(repr=False)
    path: str
    copy: bool = False

    def op(self, value: Any) -> Any:
        self.store[self.path] = _detached_copy(value) if self.copy else _map_tensors(torch.Tensor.detach, value)
        return value

    def _tensor_op(self, value: torch.Tensor) -> torch.Tensor:
        """:meth:`op` for a plain tensor (what a patch slot calls when it can)."""
        self.store[self.path] = value.detach().clone() if self.copy else value.detach()
        return value

    #: (a value the call owns is recorded as it is: what a slot binds straight into the graph)
    _tensor_op_owned = _tensor_op

    _looks_only = True  # returns its value untouched


@dataclass
class _Plan:
    """One selection in one variant: the recorders (sharing one store) and stack entries."""

    store: Dict[str, Any]
    entries: List[StackEntry]
    paths: List[str] = field(default_factory=list)


def values_of(root: NodePath) -> List[NodePath]:
    """Every whole value node under ``root`` (no parts), in graph order, child graphs in place."""
    out: List[NodePath] = []

    def walk(node: NodePath) -> None:
        for child in node:
            if child._np_graph is not None:
                walk(child)
            elif child._np_node is not None and not child._np_keys:
                out.append(child)

    walk(root)
    return out


def _key(value: NodePath) -> SlotKey:
    assert value._np_node is not None
    return value._np_graph_path, value._np_node.name, value._np_keys


def select(root: NodePath, nodes: NodeSelector) -> Dict[str, SlotKey]:
    """``{path: slot key}`` of what ``nodes`` selects (see the module docstring): glob
    matches in graph order, exact paths as given (an exact path may name a part,
    ``output|logits``, or an alias, ``input``).

    :raises NodePathError: a glob or path that selects nothing (with close matches).
    :raises NotAValueError: an exact path names a module graph.
    :raises TypeError: ``nodes`` is not a str, a list of str or a callable.
    """
    values = values_of(root)
    computed = [v for v in values if v._np_node is not None and v._np_node.op != "get_attr"]
    if callable(nodes) and not isinstance(nodes, str):
        return {str(v): _key(v) for v in computed if nodes(str(v))}
    patterns = [nodes] if isinstance(nodes, str) else list(nodes) if isinstance(nodes, (list, tuple)) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"nodes= takes a glob, a list of globs or paths, or a predicate; got {type(nodes).__name__}")
    chosen: Dict[str, SlotKey] = {}
    for pattern in patterns:
        if not any(c in pattern for c in "*?["):
            chosen[pattern] = root._np_resolve_value(pattern)  # (raises with close matches)
            continue
        hits = [v for v in computed if fnmatch.fnmatchcase(str(v), pattern)]
        if not hits:
            suggestions = close_matches(pattern, [str(v) for v in computed])
            raise NodePathError(
                f"nodes={pattern!r} selects no value of this graph", node_path=pattern, suggestions=suggestions,
                hint="patterns are fnmatch globs over node paths (print pg.graph to see them); close matches: "
                + ", ".join(suggestions or ["(none)"]))
        for hit in hits:
            chosen[str(hit)] = _key(hit)
    return chosen


def plan_for(variant: Variant, root: NodePath, nodes: NodeSelector, writes: bool) -> _Plan:
    """The recorders of ``nodes`` in ``variant``, made once per variant and selection (a
    predicate is selected again on every call)."""
    memo: Dict[Any, _Plan] = variant.__dict__.setdefault("_record_plans", {})
    key = nodes if isinstance(nodes, str) else tuple(nodes) if isinstance(nodes, (list, tuple)) else None
    plan = memo.get(key) if key is not None else None
    if plan is not None:
        return plan
    store: Dict[str, Any] = {}
    entries: List[StackEntry] = []
    paths: List[str] = []
    for path, slot in select(root, nodes).items():
        entries.append((slot, [Recorder(store=store, path=path, copy=writes)], variant))
        paths.append(path)
    plan = _Plan(store, entries, paths)
    if key is not None:
        memo[key] = plan
    return plan


def record(pg: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], nodes: NodeSelector) -> Tuple[Any, Dict[str, Any]]:
    """``pg.record``: the call's output and ``{node path: value}`` of the selected nodes."""
    variant = pg._call_variant(args, kwargs)
    plan = plan_for(variant, pg._node_paths(variant), nodes, variant.installer.writes)
    plan.store.clear()
    pg._patch_stack.append(plan.entries)
    try:
        pg._sync()
        output = pg(*args, **kwargs)
    finally:
        leave(pg._patch_stack, plan.entries)
        pg._sync()
    values = {path: plan.store[path] for path in plan.paths if path in plan.store}
    plan.store.clear()
    return output, values


__all__ = ["NodeSelector", "Recorder", "record", "select", "values_of"]
