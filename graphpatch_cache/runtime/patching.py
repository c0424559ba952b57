"""Applying patches: a patched node gets one extra ``call_module`` node after it.

Unpatched graphs carry no patch machinery at all (their code is exactly the extracted
graph). Entering a patch context gives each graph holding a patched node the code of that
graph with a call of a :class:`PatchSlot` after each patched node, and sets the slots; leaving
restores the graphs' own code. Patched code is generated once per distinct graph code and
set of patched nodes (memoized on the graph's own forward function, which identical graphs
share), so a patch context entered again, or on another identical layer, generates none and
touches no ``torch.fx`` graph.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple, cast

import torch
import torch.fx

from ..errors import PatchError
from ..integrations.bitsandbytes import patch_view
from ..patches import Patch
from .bind import ModuleGraphModule
from .routing import unwrap
from ..artifact.names import join_path

SlotKey = Tuple[str, str, Tuple[Any, ...]]  # (graph path, node name, sub-path keys)
_SLOT_PREFIX = "_graphpatch_slot_"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _get_part(value: Any, key: Any, node_path: str) -> Any:
    """``value``'s part ``key`` (an int for ``sub_N``). Paths into values whose structure was
    recorded are checked at ``pg.patch()``; this catches the rest when the graph runs."""
    part = f"sub_{key}" if isinstance(key, int) else key
    if isinstance(value, torch.Tensor):
        # writing the patched part back would be an in-place write into the value (perhaps a
        # weight): a tensor is patched whole, with a slice inside the patch
        raise PatchError(
            f"node {node_path!r}: {_describe(value)} has no parts (asked for {part!r})",
            node_path=node_path,
            hint="patch the tensor itself and index it in the patch (slice=...)",
        )
    keys = list(value.keys()) if hasattr(value, "keys") else (
        [f"sub_{i}" for i in range(len(value))] if isinstance(value, (tuple, list)) else []
    )
    if isinstance(key, int) and hasattr(value, "keys"):
        # a ModelOutput also indexes by position, but cannot be rebuilt by one: name the field
        raise PatchError(f"node {node_path!r}: {_describe(value)} has its parts by name, not {part!r}; parts: {keys}",
                         node_path=node_path, hint=f"use one of {keys}")
    try:
        return value[key]
    except (KeyError, IndexError, TypeError) as exc:
        raise PatchError(
            f"node {node_path!r}: {_describe(value)} has no part {part!r}; parts: {keys}",
            node_path=node_path,
        ) from exc


def _set_part(value: Any, key: Any, part: Any) -> Any:
    if isinstance(value, tuple):
        items = list(value)
        items[key] = part
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        items = list(value)
        items[key] = part
        return items
    if type(value) is dict:
        out = dict(value)
        out[key] = part
        return out
    value[key] = part  # ModelOutput and other mappings created by this forward pass
    return value


def apply_patches(value: Any, patches: Sequence[Patch[Any]], keys: Tuple[Any, ...], node_path: str) -> Any:
    """Run ``patches`` in order on ``value`` (or on the part at ``keys``)."""
    if keys:
        part = _get_part(value, keys[0], node_path)
        return _set_part(value, keys[0], apply_patches(part, patches, keys[1:], node_path))
    for patch in patches:
        try:
            value = patch(value)
        except PatchError:
            raise
        except (IndexError, RuntimeError, ValueError, TypeError) as exc:
            where = getattr(patch, "slice", None)
            raise PatchError(
                f"{type(patch).__name__} at node {node_path!r} failed on {_describe(value)}"
                + (f" with slice {where!r}" if where is not None else "")
                + f": {exc}",
                node_path=node_path,
                hint="check the slice against the node's shape (pg.graph[path]._shape)",
            ) from exc
    return value


def _is_slot(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(_SLOT_PREFIX)


#: what a graph's patched code depends on beyond its own code: each slot's (node name,
#: sub-path keys), in the order they were attached (slots on one value chain in that order)
Layout = Tuple[Tuple[str, Tuple[Any, ...]], ...]


class PatchSlot:
    """What the code of a patched graph calls on one value (``self._graphpatch_slot_N``): a
    plain object in the graph module's ``__dict__``, not a registered module, so that entering
    a patch context neither builds nor registers modules."""

    __slots__ = ("node_path", "keys", "patches", "fast")

    def __init__(self, node_path: str, keys: Tuple[Any, ...], patches: List[Patch[Any]]) -> None:
        self.node_path = node_path
        self.keys = keys
        self.set(patches)

    def set(self, patches: List[Patch[Any]]) -> None:
        self.patches = patches
        #: a lone patch of a class with a plain-tensor form of its op (``_tensor_op``, defined
        #: by that class itself: a subclass that overrides ``op`` does not inherit it)
        only = patches[0] if len(patches) == 1 and not self.keys else None
        self.fast = getattr(only, "_tensor_op") if only is not None and "_tensor_op" in type(only).__dict__ else None

    def __call__(self, value: Any) -> Any:
        fast = self.fast
        if fast is not None and type(value) is torch.Tensor:  # (not a Parameter: 8-bit weights are shown dequantized)
            return fast(value)
        view = patch_view(value) if not self.keys else value
        out = apply_patches(view, self.patches, self.keys, self.node_path)
        # patches that only looked (probes) leave a quantized weight on its exact 8-bit path
        return value if out is view else out

    def __repr__(self) -> str:
        return f"PatchSlot({self.node_path!r}, {len(self.patches)} patches)"


def _compiled_of(gm: torch.fx.GraphModule) -> Tuple[Any, str, Any]:
    return type(gm).forward, gm.code, getattr(gm, "_lineno_map", None)


def _set_compiled(gm: torch.fx.GraphModule, compiled: Tuple[Any, str, Any]) -> None:
    forward, code, lineno_map = compiled
    type(gm).forward = forward  # fx gives every GraphModule a class of its own
    state = gm.__dict__  # (plain attributes: Module.__setattr__ costs more than the rest here)
    state["_code"] = code
    state["_lineno_map"] = lineno_map


def _slot_name(i: int) -> str:
    while len(_SLOT_NAMES) <= i:
        _SLOT_NAMES.append(f"{_SLOT_PREFIX}{len(_SLOT_NAMES)}")
    return _SLOT_NAMES[i]


_SLOT_NAMES: List[str] = []


#: per unpatched forward function (shared by graphs with identical code) and layout: the
#: patched code, generated once per process
_PATCHED_CODE: "weakref.WeakKeyDictionary[Any, OrderedDict[Layout, Tuple[Any, str, Any]]]" = weakref.WeakKeyDictionary()
#: layouts remembered per graph code (a sweep patching one node after another makes one each)
_LAYOUTS = 256


def _patched_code(gm: torch.fx.GraphModule, base: Tuple[Any, str, Any], layout: Layout) -> Tuple[Any, str, Any]:
    """The code of ``gm`` with a slot call after each node of ``layout`` (the i-th calls
    ``self._graphpatch_slot_i``), from the memo or generated now. The graph itself is left as
    it was: slots are inserted, compiled and removed again."""
    known = _PATCHED_CODE.setdefault(base[0], OrderedDict())
    compiled = known.get(layout)
    if compiled is not None:
        known.move_to_end(layout)
        return compiled
    graph = gm.graph
    inserted = [_insert_slot(graph, node_name, _slot_name(i)) for i, (node_name, _) in enumerate(layout)]
    try:
        gm.recompile()
        compiled = known[layout] = _compiled_of(gm)
        while len(known) > _LAYOUTS:
            known.popitem(last=False)
    finally:
        for node in reversed(inserted):
            _remove_slot(graph, node)
        _set_compiled(gm, base)
    return compiled


def _insert_slot(graph: torch.fx.Graph, node_name: str, attr: str) -> torch.fx.Node:
    """A ``call_module`` of ``attr`` on the value of node ``node_name``, after the slots
    already on it."""
    target = next(n for n in graph.nodes if n.name == node_name)
    if target.op == "output" and target.meta.get("graphpatch", {}).get("extras"):
        # (the module's output, values returned for its parent only): patch the former
        value, extras = target.args[0]
        with graph.inserting_before(target):
            node = graph.create_node("call_module", attr, (value,))
        target.args = ((node, extras),)
        return node
    if target.op == "output":
        with graph.inserting_before(target):
            node = graph.create_node("call_module", attr, (target.args[0],))
        target.args = (node,)
        return node
    current = target  # end of the chain of slots already attached to this node
    while True:
        nxt = next((u for u in current.users if _is_slot(u) and u.args[0] is current), None)
        if nxt is None:
            break
        current = nxt
    anchor = current
    if current.op == "placeholder":
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        node = graph.create_node("call_module", attr, (current,))
    current.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def _remove_slot(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    source = cast(torch.fx.Node, node.args[0])
    node.replace_all_uses_with(source)
    for user in list(node.users):  # an output with extras holds the slot in a tuple
        user.args = torch.fx.node.map_arg(user.args, lambda n: source if n is node else n)
    graph.erase_node(node)


class Skeleton:
    """What a set of patched nodes installs into a graph tree, whatever the patches: per
    graph, its patched code and its slots; the slot of each active key in order (None where
    this variant has no such node); which graphs are flagged. Made once per set of patched
    nodes and reused: entering a patch loop's next block with new patch objects on the same
    nodes only hands the slots their new patches."""

    __slots__ = ("graphs", "order", "marked", "lacking")

    def __init__(self, graphs: Dict[str, Tuple[Tuple[Any, str, Any], Dict[str, PatchSlot]]],
                 order: List[Optional[PatchSlot]], marked: FrozenSet[str], lacking: List[SlotKey]) -> None:
        self.graphs = graphs
        self.order = order
        self.marked = marked
        self.lacking = lacking


class InstallState:
    """One set of active patches, ready to install: a :class:`Skeleton`, the patch list of
    each of its slots, and the keys this variant lacks."""

    __slots__ = ("skeleton", "patches", "missing", "refs")

    def __init__(self, skeleton: Skeleton, patches: List[List[Patch[Any]]], missing: List[SlotKey]) -> None:
        self.skeleton = skeleton
        self.patches = patches
        self.missing = missing
        #: what the state was prepared from, kept alive while it is remembered (see patch_stack.sync)
        self.refs: Any = None


#: how many skeletons an installer remembers
_SKELETONS = 8


class PatchInstaller:
    """Keeps the code and slots of one bound graph tree in line with the active patches."""

    def __init__(self, root: ModuleGraphModule) -> None:
        self.modules: Dict[str, ModuleGraphModule] = {}

        def walk(gm: ModuleGraphModule, path: str) -> None:
            self.modules[path] = gm
            for name, child in gm.named_children():
                child = unwrap(child)
                if isinstance(child, ModuleGraphModule):
                    walk(child, join_path(path, name))

        walk(cast(ModuleGraphModule, unwrap(root)), "")
        # (node names from the graphs' data: reading gm.graph would build a lazily bound graph)
        self._names = {path: frozenset(nd.name for nd in gm._graphpatch_data.nodes) for path, gm in self.modules.items()}
        #: each graph's own (unpatched) code: leaving a context compiles nothing
        self._base = {path: _compiled_of(gm) for path, gm in self.modules.items()}
        self._skeletons: "OrderedDict[Tuple[SlotKey, ...], Skeleton]" = OrderedDict()
        self._installed = InstallState(Skeleton({}, [], frozenset(), []), [], [])
        self._mark(frozenset())

    @property
    def missing(self) -> List[SlotKey]:
        """Active patch keys whose node this graph variant does not have."""
        return self._installed.missing

    def prepare(self, active: Dict[SlotKey, List[Patch[Any]]], missing: Sequence[SlotKey] = ()) -> InstallState:
        """The state that installs ``active``."""
        keys = tuple(active)
        skeleton = self._skeletons.get(keys)
        if skeleton is None:
            skeleton = self._skeletons[keys] = self._skeleton(keys)
            while len(self._skeletons) > _SKELETONS:
                self._skeletons.popitem(last=False)
        else:
            self._skeletons.move_to_end(keys)
        return InstallState(skeleton, list(active.values()), list(missing) + skeleton.lacking)

    def _skeleton(self, keys: Tuple[SlotKey, ...]) -> Skeleton:
        """The code and slots of a set of patched nodes (generating slot code the first time
        a graph code has these patched nodes)."""
        names = self._names
        per_graph: Dict[str, List[SlotKey]] = {}
        lacking: List[SlotKey] = []
        for key in keys:
            graph_names = names.get(key[0])
            if graph_names is None or key[1] not in graph_names:
                lacking.append(key)
            else:
                per_graph.setdefault(key[0], []).append(key)
        slot_of: Dict[SlotKey, PatchSlot] = {}
        graphs = {}
        marked: Set[str] = set()
        for graph_path, graph_keys in per_graph.items():
            layout: Layout = tuple((key[1], key[2]) for key in graph_keys)
            compiled = _patched_code(self.modules[graph_path], self._base[graph_path], layout)
            slots = {}
            for i, key in enumerate(graph_keys):
                slots[_slot_name(i)] = slot_of[key] = PatchSlot(join_path(graph_path, key[1]), key[2], [])
            graphs[graph_path] = (compiled, slots)
            parts = graph_path.split(".") if graph_path else []
            marked.update(".".join(parts[:depth]) for depth in range(len(parts) + 1))
        order = [slot_of.get(key) for key in keys]
        return Skeleton(graphs, order, frozenset(marked), lacking)

    def install(self, state: InstallState) -> None:
        """Give each graph the code and slots of ``state`` (its own code where it has none),
        and each slot its patches."""
        before = self._installed.skeleton
        skeleton = state.skeleton
        if skeleton is not before:
            for graph_path in before.graphs:
                if graph_path not in skeleton.graphs:
                    _set_compiled(self.modules[graph_path], self._base[graph_path])
            for graph_path, (compiled, slots) in skeleton.graphs.items():
                gm = self.modules[graph_path]
                _set_compiled(gm, compiled)
                gm.__dict__.update(slots)
            if skeleton.marked != before.marked:
                self._mark(skeleton.marked, before.marked ^ skeleton.marked)
        for slot, patches in zip(skeleton.order, state.patches):
            if slot is not None and slot.patches is not patches:
                slot.set(patches)
        self._installed = state

    def _mark(self, marked: FrozenSet[str], changed: Optional[FrozenSet[str]] = None) -> None:
        """Flag each graph that holds a slot, itself or below (``_graphpatch_patched``): an
        opaque parent's call of an unflagged child runs the child module itself, as nothing
        in that call can be patched or probed (see ``routing.CallRouter``). ``changed``: the
        only graphs whose flag changes (default: all)."""
        for path in self.modules if changed is None else changed:
            self.modules[path].__dict__["_graphpatch_patched"] = path in marked


__all__ = ["InstallState", "PatchInstaller", "Skeleton", "PatchSlot", "apply_patches"]
