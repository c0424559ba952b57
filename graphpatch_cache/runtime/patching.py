"""Applying patches: a patched node gets one extra ``call_module`` node after it.

Unpatched graphs carry no patch machinery at all (their code is exactly the extracted
graph). Entering a patch context inserts a :class:`PatchSlot` after each patched node of the
affected module graphs and gives only those graphs new code; leaving removes the slots and
restores the graphs' own code. Code is generated once per graph and set of slots, so a patch
context entered again (the usual loop) generates none.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, cast

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


def _slot_layout(graph: torch.fx.Graph) -> Tuple[Any, ...]:
    """What the code of a graph with slots depends on beyond the extracted graph: each slot
    (by its module's name) in graph order, with what it reads (a node, or the slot before it
    on the same value; node names of slots are not stable across entries, their targets are)."""
    def reads(value: Any) -> str:
        return str(torch.fx.node.map_arg(value, lambda n: str(n.target) if _is_slot(n) else n.name))

    return tuple((node.target, reads(node.args[0])) for node in graph.nodes if _is_slot(node))


def _compiled_of(gm: torch.fx.GraphModule) -> Tuple[Any, str, Any]:
    return type(gm).forward, gm.code, getattr(gm, "_lineno_map", None)


class PatchSlot(torch.nn.Module):
    """The extra node that applies a patch list to one value."""

    def __init__(self, node_path: str, keys: Tuple[Any, ...]) -> None:
        super().__init__()
        self.node_path = node_path
        self.keys = keys
        self.patches: List[Patch[Any]] = []

    def forward(self, value: Any) -> Any:
        view = patch_view(value) if not self.keys else value
        out = apply_patches(view, self.patches, self.keys, self.node_path)
        # patches that only looked (probes) leave a quantized weight on its exact 8-bit path
        return value if out is view else out


class PatchInstaller:
    """Keeps the slots of one bound graph tree in line with the active patches."""

    def __init__(self, root: ModuleGraphModule) -> None:
        self.modules: Dict[str, ModuleGraphModule] = {}

        def walk(gm: ModuleGraphModule, path: str) -> None:
            self.modules[path] = gm
            for name, child in gm.named_children():
                child = unwrap(child)
                if isinstance(child, ModuleGraphModule):
                    walk(child, join_path(path, name))

        walk(cast(ModuleGraphModule, unwrap(root)), "")
        self.slots: Dict[SlotKey, Tuple[PatchSlot, torch.fx.Node]] = {}
        self._mark_patched()
        #: each key's slot module and attribute name, kept registered once made: the code
        #: generated for a set of slots names them, so it stays valid for the next entry
        self._made: Dict[SlotKey, Tuple[PatchSlot, str]] = {}
        #: per graph path: {its slots in graph order: (forward, code, lineno map)}; the
        #: unpatched code is there from the start, so leaving a context compiles nothing
        self._compiled: Dict[str, Dict[Tuple[Any, ...], Tuple[Any, str, Any]]] = {
            path: {(): _compiled_of(gm)} for path, gm in self.modules.items()}
        #: active patch keys whose node this graph variant does not have
        self.missing: List[SlotKey] = []

    def has(self, key: SlotKey) -> bool:
        graph_path, node_name, _ = key
        gm = self.modules.get(graph_path)
        return gm is not None and any(n.name == node_name for n in gm.graph.nodes)

    def apply(self, active: Dict[SlotKey, List[Patch[Any]]], missing: Sequence[SlotKey] = ()) -> None:
        """Make the slots match ``active``; ``missing`` are keys known to have no node here."""
        touched = set()
        for key in [k for k in self.slots if k not in active]:
            slot, node = self.slots.pop(key)
            gm = self.modules[key[0]]
            node.replace_all_uses_with(cast(torch.fx.Node, node.args[0]))
            for user in list(node.users):  # an output with extras holds the slot in a tuple
                user.args = torch.fx.node.map_arg(user.args, lambda n: node.args[0] if n is node else n)
            gm.graph.erase_node(node)
            touched.add(key[0])
        self.missing = list(missing) + [key for key in active if not self.has(key)]
        for key, patches in active.items():
            if key in self.missing:
                continue
            if key not in self.slots:
                self._insert(key)
                touched.add(key[0])
            self.slots[key][0].patches = list(patches)
        for graph_path in touched:
            self._compile(graph_path)
        self._mark_patched()

    def _compile(self, graph_path: str) -> None:
        """Give the graph the code of its current slots: generated once per set of slots (fx
        code generation costs ~1 ms a graph; entering and leaving a patch context touches
        every graph holding a patched node)."""
        gm = self.modules[graph_path]
        layout = _slot_layout(gm.graph)
        known = self._compiled[graph_path].get(layout)
        if known is None:
            gm.recompile()
            self._compiled[graph_path][layout] = _compiled_of(gm)
            return
        forward, code, lineno_map = known
        type(gm).forward = forward  # fx gives every GraphModule a class of its own
        gm._code = code
        gm._lineno_map = lineno_map

    def _mark_patched(self) -> None:
        """Flag each graph that holds a slot, itself or below (``_graphpatch_patched``): an
        opaque parent's call of an unflagged child runs the child module itself, as nothing
        in that call can be patched or probed (see ``routing.CallRouter``)."""
        marked = set()
        for graph_path, _, _ in self.slots:
            parts = graph_path.split(".") if graph_path else []
            for depth in range(len(parts) + 1):
                marked.add(".".join(parts[:depth]))
        for path, gm in self.modules.items():
            gm.__dict__["_graphpatch_patched"] = path in marked

    def _insert(self, key: SlotKey) -> None:
        graph_path, node_name, keys = key
        gm = self.modules[graph_path]
        target = next(n for n in gm.graph.nodes if n.name == node_name)
        node_path = join_path(graph_path, node_name)
        made = self._made.get(key)
        if made is None:
            slot, attr = PatchSlot(node_path, keys), f"{_SLOT_PREFIX}{len(self._made) + 1}"
            gm.add_module(attr, slot)
            self._made[key] = made = (slot, attr)
        slot, attr = made
        graph = gm.graph
        if target.op == "output" and target.meta.get("graphpatch", {}).get("extras"):
            # (the module's output, values returned for its parent only): patch the former
            value, extras = target.args[0]
            with graph.inserting_before(target):
                node = graph.call_module(attr, (value,))
            target.args = ((node, extras),)
        elif target.op == "output":
            with graph.inserting_before(target):
                node = graph.call_module(attr, (target.args[0],))
            target.args = (node,)
        else:
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
                node = graph.call_module(attr, (current,))
            current.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        self.slots[key] = (slot, node)


__all__ = ["PatchInstaller", "PatchSlot", "apply_patches"]
