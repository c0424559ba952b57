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

from ..artifact.names import join_path
from ..patches import Patch
from .bind import SETTLE_ATTR, ModuleGraphModule
from .ownership import owned_values
from .routing import unwrap
from .slots import PatchSlot, looks_only, release, set_patches

SlotKey = Tuple[str, str, Tuple[Any, ...]]  # (graph path, node name, sub-path keys)
_SLOT_PREFIX = "_graphpatch_slot_"


def _is_slot(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(_SLOT_PREFIX)


#: what a graph's patched code depends on beyond its own code: each slot's (node name,
#: sub-path keys), in the order they were attached (slots on one value chain in that order)
Layout = Tuple[Tuple[str, Tuple[Any, ...]], ...]


def _compiled_of(gm: torch.fx.GraphModule) -> Tuple[Any, str, Any]:
    state = gm.__dict__  # (not gm.code: reading it settles the installer, see graph_module.ModuleGraphModule.code)
    return type(gm).forward, state["_code"], state.get("_lineno_map")


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

    __slots__ = ("skeleton", "patches", "missing", "refs", "plain")

    def __init__(self, skeleton: Skeleton, patches: List[List[Patch[Any]]], missing: List[SlotKey],
                 plain: bool = False) -> None:
        self.skeleton = skeleton
        self.patches = patches
        self.missing = missing
        #: every patch only looks (see :func:`looks_only`), and no graph writes in place
        self.plain = plain
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
        #: skeletons whose slots may hold patches
        self._holding: Set[Skeleton] = set()
        #: id of a keys tuple -> (that tuple, kept alive, and its skeleton)
        self._by_identity: Dict[int, Tuple[Tuple[SlotKey, ...], Skeleton]] = {}
        self._installed = InstallState(Skeleton({}, [], frozenset(), []), [], [])
        #: the skeleton whose code the graphs run (the installed one, or the last one after
        #: leaving every block, until :meth:`settle`)
        self._code = self._installed.skeleton
        self._rebind = False
        me = weakref.ref(self)  # (last: reading a graph's code settles through it)
        for gm in self.modules.values():
            gm.__dict__[SETTLE_ATTR] = me
        self._mark(frozenset())

    @property
    def missing(self) -> List[SlotKey]:
        """Active patch keys whose node this graph variant does not have."""
        return self._installed.missing

    def prepare(self, active: Dict[SlotKey, List[Patch[Any]]], missing: Sequence[SlotKey] = (),
                keys: Optional[Tuple[SlotKey, ...]] = None, types: Optional[Set[type]] = None) -> InstallState:
        """The state that installs ``active``. ``keys``: its keys, as a tuple object that comes
        again for the same keys (a skeleton is found by identity first: hashing thousands of
        keys costs more than the rest); ``types``: the types of its patches, when known."""
        skeleton = None
        if keys is not None:
            known = self._by_identity.get(id(keys))
            if known is not None and known[0] is keys:
                skeleton = known[1]
        if skeleton is None:
            keys = keys if keys is not None else tuple(active)
            skeleton = self._skeletons.get(keys)
            if skeleton is None:
                skeleton = self._skeletons[keys] = self._skeleton(keys)
                while len(self._skeletons) > _SKELETONS:
                    self._skeletons.popitem(last=False)
            self._by_identity[id(keys)] = (keys, skeleton)
            while len(self._by_identity) > _SKELETONS:
                del self._by_identity[next(iter(self._by_identity))]
        patches = list(active.values())
        if types is None:
            types = {type(p) for ps in patches for p in ps}
        plain = not self.writes and all(looks_only(t) for t in types)
        return InstallState(skeleton, patches, list(missing) + skeleton.lacking, plain)

    @property
    def writes(self) -> bool:
        """Whether any graph of the tree may write into a tensor in place (or runs a module's
        own code, which may; see bind)."""
        writes = self.__dict__.get("_writes")
        if writes is None:
            writes = self.__dict__["_writes"] = any(
                gm.__dict__.get("_graphpatch_writes", True) for gm in self.modules.values())
        return bool(writes)

    def owned(self) -> Dict[str, FrozenSet[str]]:
        """Per graph path, the nodes whose values a call owns (:mod:`.ownership`; none when a
        graph writes in place)."""
        owned = self.__dict__.get("_owned")
        if owned is None:
            modules = self.modules
            owned = self.__dict__["_owned"] = {} if self.writes else owned_values(
                modules[""]._graphpatch_data,
                lambda path, name: isinstance(getattr(modules[path], name, None), torch.Tensor))
        return cast(Dict[str, FrozenSet[str]], owned)

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
            owned = self.owned().get(graph_path, frozenset())
            home = self.modules[graph_path].__dict__
            for i, key in enumerate(graph_keys):
                name = _slot_name(i)
                slots[name] = slot_of[key] = PatchSlot(join_path(graph_path, key[1]), key[2],
                                                       key[1] in owned, home, name)
            graphs[graph_path] = (compiled, slots)
            parts = graph_path.split(".") if graph_path else []
            marked.update(".".join(parts[:depth]) for depth in range(len(parts) + 1))
        order = [slot_of.get(key) for key in keys]
        return Skeleton(graphs, order, frozenset(marked), lacking)

    def install(self, state: InstallState) -> None:
        """Give each slot of ``state`` its patches, and each graph the code of ``state`` (its
        own code where it has none). Leaving every block (a state with no patches) leaves the
        patched code in place until :meth:`settle`: its slots, released, pass values through,
        and a patch loop that enters the same nodes again swaps no code at all."""
        if not state.patches and not state.skeleton.graphs:
            self._installed = state
            return
        self._swap_code(state.skeleton)
        set_patches(state.skeleton.order, state.patches, state.plain, self._rebind)
        self._rebind = False
        if state.patches:
            self._holding.add(state.skeleton)
        self._installed = state

    def settle(self) -> None:
        """Give every graph the code of the installed state (see :meth:`install`): a call
        with no patch runs the graphs' own code."""
        if self._code is not self._installed.skeleton:
            self._swap_code(self._installed.skeleton)

    def _swap_code(self, skeleton: Skeleton) -> None:
        before = self._code
        if skeleton is before:
            return
        for graph_path in before.graphs:
            if graph_path not in skeleton.graphs:
                _set_compiled(self.modules[graph_path], self._base[graph_path])
        for graph_path, (compiled, _) in skeleton.graphs.items():
            _set_compiled(self.modules[graph_path], compiled)
        if skeleton.marked != before.marked:
            self._mark(skeleton.marked, before.marked ^ skeleton.marked)
        self._code = skeleton
        self._rebind = True  # (the slots of a skeleton are bound when its code is installed)

    def release(self) -> None:
        """Let go of the patches of every slot not installed now (they would keep what a
        block's patches recorded alive until the next block)."""
        installed = self._installed.skeleton
        for skeleton in [s for s in self._holding if s is not installed]:
            release(skeleton.order)
            self._holding.discard(skeleton)

    def _mark(self, marked: FrozenSet[str], changed: Optional[FrozenSet[str]] = None) -> None:
        """Flag each graph that holds a slot, itself or below (``_graphpatch_patched``): an
        opaque parent's call of an unflagged child runs the child module itself, as nothing
        in that call can be patched or probed (see ``routing.CallRouter``). ``changed``: the
        only graphs whose flag changes (default: all)."""
        for path in self.modules if changed is None else changed:
            self.modules[path].__dict__["_graphpatch_patched"] = path in marked


__all__ = ["InstallState", "PatchInstaller", "Skeleton"]
