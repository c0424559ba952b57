"""The patch stack of a :class:`~graphpatch_cache.runtime.patchable_graph.PatchableGraph`:
the graph variants it patches, checking a patch map, and moving each active patch to the same
node in every variant's graph.

Node names come from the model's code and dynamo's numbering, so the same op can have another
name in another variant's graph (a mask adds ops before it). A patch is moved to the node with
the same identity (op, target, source line, occurrence), not the same name; where there is
none, the patch is missing in that variant and calls into it refuse.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, cast, overload

from ..artifact import GraphArtifact
from ..artifact.signature import SignatureMatcher
from ..errors import NodePathError, NonTensorPatchError, NotAValueError, PatchMapError
from ..patches import NUMBER_KINDS, Patch, number_refusal
from .bind import ModuleGraphModule
from .node_path import NodePath
from .patching import InstallState, PatchInstaller, SlotKey


@dataclass
class Variant:
    """The graphs of one call signature, bound to the model."""

    artifact: GraphArtifact
    root: ModuleGraphModule
    matcher: SignatureMatcher
    installer: PatchInstaller
    key: str
    #: whether the root graph returns key/value cache tensors (known after the first call)
    returns_cache: Optional[bool] = None


#: one entry of a ``with pg.patch`` block: (slot key relative to the origin variant's graph,
#: patches, origin variant)
#: a node's identity across variants: (op, target, source line, occurrence), or (op, name)
_Identity = Tuple[Any, ...]

StackEntry = Tuple[SlotKey, List[Patch[Any]], Variant]


def patch_lists(patch_map: Any) -> Iterator[Tuple[str, List[Patch[Any]]]]:
    """``pg.patch``'s argument as (node path, patches) pairs, each checked as it is reached.

    :raises PatchMapError: (a TypeError) not a dict, a key that is not a node path, or a value
        that is not a Patch or a list of Patches.
    """
    if not isinstance(patch_map, Mapping):
        raise PatchMapError(
            f"pg.patch() takes a dict {{node path: patch or list of patches}}, got {type(patch_map).__name__}"
        )
    for key, value in patch_map.items():
        if not isinstance(key, (str, NodePath)):
            raise PatchMapError(
                f"patch keys are node paths (str or NodePath), got {type(key).__name__}: {key!r}",
                node_path=repr(key))
        path = str(key)
        if isinstance(value, Patch):
            patches = [value]
        elif isinstance(value, (list, tuple)):
            patches = list(value)
        else:
            raise PatchMapError(
                f"the value for {path!r} must be a Patch or a list of Patches, got {type(value).__name__}",
                node_path=path)
        for p in patches:
            if not isinstance(p, Patch):
                raise PatchMapError(
                    f"the value for {path!r} holds {type(p).__name__} {p!r:.60}, which is not a Patch",
                    node_path=path, hint="wrap a function in CustomPatch(custom_op=fn)")
        yield path, patches


#: how many path tuples a resolver remembers as blocks
_BLOCKS = 8


class Block(Sequence[StackEntry]):
    """The entries of a ``with pg.patch`` block of lone patches, as parallel sequences (its
    entries are made only when asked for): the slot keys (one tuple object for every entry
    of the same paths), the patch lists, the origins, the variant whose nodes they all are
    (None when not one, or a key twice), and the patches' types."""

    def __init__(self, keys: Tuple[SlotKey, ...], lists: List[List[Patch[Any]]], origins: Tuple[Variant, ...],
                 origin: Optional[Variant], types: Set[type]) -> None:
        self.keys = keys
        self.lists = lists
        self.origins = origins
        self.origin = origin
        self.types = types

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[StackEntry]:
        return zip(self.keys, self.lists, self.origins)

    @overload
    def __getitem__(self, i: int) -> StackEntry: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[StackEntry]: ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return list(self)[i]
        return self.keys[i], self.lists[i], self.origins[i]


class PathResolver:
    """Node paths of a patch map -> (slot key, variant): against the example's graph first,
    then other variants' graphs. What resolved is remembered (graphs do not change, and a
    patch loop resolves the same paths on every entry)."""

    def __init__(self, variants: List[Variant], node_paths: Callable[[Variant], NodePath]) -> None:
        self._variants = variants  # (the PatchableGraph's own list: variants added later count)
        self._node_paths = node_paths
        self._known: Dict[str, Tuple[SlotKey, Variant]] = {}
        #: paths whose value is a Python number -> its type (see :func:`number_refusal`)
        self._numbers: Dict[str, str] = {}
        #: per tuple of paths entered before: (slot keys, origins, the one origin of all of
        #: them when each key is there once, else None, the places of Python-number paths)
        self._blocks: Dict[Tuple[Any, ...], Tuple[Tuple[SlotKey, ...], Tuple[Variant, ...], Optional[Variant],
                                                  Tuple[int, ...]]] = {}

    def entries(self, patch_map: Any) -> Sequence[StackEntry]:
        """The stack entries of ``pg.patch(patch_map)``, each checked as it is reached.

        A patch loop enters the same paths on every call, thousands of them when it records
        everything: a map of lone patches on paths resolved before as a whole comes back as
        a :class:`Block` that keeps what is needed to install it (its slot keys, patch
        lists and patch types) next to the entries."""
        if type(patch_map) is dict and patch_map:
            paths = tuple(patch_map)
            known = self._blocks.get(paths)
            if known is not None:
                values = list(patch_map.values())
                types = set(map(type, values))
                if all(issubclass(t, Patch) for t in types):
                    keys, origins, origin, numbers = known
                    for i in numbers:
                        self._check_number(paths[i], [values[i]])
                    lists = [[v] for v in values]
                    return Block(keys, lists, origins, origin, types)
        entries = self._entries(patch_map)
        if type(patch_map) is dict and entries and len(entries) == len(patch_map) and all(
                type(path) is str for path in patch_map) and tuple(patch_map) not in self._blocks:
            keys = tuple(e[0] for e in entries)
            origins = tuple(e[2] for e in entries)
            first = origins[0]
            unique = len(set(keys)) == len(keys)
            origin = first if unique and all(o is first for o in origins) else None
            numbers = tuple(i for i, path in enumerate(patch_map) if path in self._numbers)
            self._blocks[tuple(patch_map)] = (keys, origins, origin, numbers)
            while len(self._blocks) > _BLOCKS:
                del self._blocks[next(iter(self._blocks))]
        return entries

    def _entries(self, patch_map: Any) -> List[StackEntry]:
        if not isinstance(patch_map, Mapping):
            list(patch_lists(patch_map))  # (raises)
        known = self._known
        entries: List[StackEntry] = []
        append = entries.append
        for path, value in patch_map.items():
            hit = known.get(path) if type(path) is str else None
            if hit is not None and isinstance(value, Patch):
                if path in self._numbers:
                    self._check_number(path, [value])
                append((hit[0], [value], hit[1]))
                continue
            for checked, patches in patch_lists({path: value}):
                key, origin = self(checked)
                if checked in self._numbers:
                    self._check_number(checked, patches)
                append((key, patches, origin))
        return entries

    def _check_number(self, path: str, patches: List[Patch[Any]]) -> None:
        """Refuse a patch that writes tensors on a node whose value is a Python number.

        The value's type comes from the artifact's metadata: a usability check only (a wrong
        one can only refuse a patch, or let it fail later as it would have)."""
        kind = self._numbers[path]
        for patch in patches:
            why = number_refusal(patch, kind)
            if why is not None:
                raise NonTensorPatchError(
                    f"{type(patch).__name__} cannot patch {path!r}: its value is a Python {kind}, not a "
                    f"tensor ({why})", node_path=path, value_type=kind,
                    hint="patch a tensor node instead, look at the value with ProbePatch, or change it "
                    f"deliberately with ReplacePatch(value=<a Python {kind}>) or CustomPatch")

    def __call__(self, path: str) -> Tuple[SlotKey, Variant]:
        known = self._known.get(path)
        if known is None:
            known = self._known[path] = self._resolve(path)
        return known

    def _resolve(self, path: str) -> Tuple[SlotKey, Variant]:
        try:
            found = self._node_paths(self._variants[0])._np_resolve_value(path), self._variants[0]
        except NodePathError as first:
            if isinstance(first, NotAValueError):
                raise
            for variant in self._variants[1:]:
                try:
                    found = self._node_paths(variant)._np_resolve_value(path), variant
                    break
                except NodePathError:
                    continue
            else:
                raise
        node, extra = self._node_paths(found[1])._np_find(path)
        meta = node._np_meta if not extra and isinstance(node._np_meta, dict) else {}
        if "shape" not in meta and meta.get("type") in NUMBER_KINDS:
            self._numbers[path] = meta["type"]
        return found


def active_patches(stack: List[Sequence[StackEntry]],
                   variant: Variant) -> Tuple[Dict[SlotKey, List[Patch[Any]]], List[SlotKey]]:
    """The active patches, keyed by ``variant``'s node names, and the keys it lacks."""
    block = stack[0] if len(stack) == 1 else None
    if block is not None and all(origin is variant for _, _, origin in block):
        # (one block on this variant's own nodes, each once: its own lists, as they are)
        active = {key: patches for key, patches, _ in stack[0]}
        if len(active) == len(stack[0]):
            return active, []
    active = {}
    missing: List[SlotKey] = []
    for entries in stack:
        for key, patches, origin in entries:
            local = key if origin is variant else translate(origin, key, variant)
            if local is None:
                missing.append(key)
                continue
            active.setdefault(local, []).extend(patches)
    return active, missing


def leave(stack: List[Sequence[StackEntry]], entries: Sequence[StackEntry]) -> None:
    """Take a block's entries off the stack, by identity (``list.remove`` compares contents,
    and dataclass patches compare their fields: a probe's recorded tensor among them)."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is entries:
            del stack[i]
            return


def forget(variants: List[Variant], entries: Sequence[StackEntry]) -> None:
    """Drop the prepared states of stacks holding a block that is gone for good (a ``with``
    block's entries are made per entry): they cannot come back, and would keep its patches
    (and what they recorded) alive; so would the slots no longer installed."""
    gone = id(entries)
    for variant in variants:
        states = variant.__dict__.get("_states")
        if states:
            for key in [key for key in states if gone in key]:
                del states[key]
        variant.installer.release()


#: how many prepared patch states a variant remembers (see :func:`sync`)
_STATES = 8


def sync(stack: List[Sequence[StackEntry]], variant: Variant) -> None:
    """Install the active patches of ``stack`` into ``variant``'s graphs. The prepared state
    is remembered per stack (by the identity of its blocks' entry lists, which stay alive
    with it): entering the same blocks again, or recording the same selection, installs
    what was prepared the first time."""
    states: "OrderedDict[Tuple[int, ...], InstallState]" = variant.__dict__.setdefault("_states", OrderedDict())
    key = tuple(id(entries) for entries in stack)
    state = states.get(key)
    if state is None:
        block = stack[0] if len(stack) == 1 else None
        if isinstance(block, Block) and block.origin is variant:
            state = variant.installer.prepare(dict(zip(block.keys, block.lists)), (), block.keys, block.types)
        else:
            state = variant.installer.prepare(*active_patches(stack, variant))
        state.refs = list(stack)
        states[key] = state
        while len(states) > _STATES:
            states.popitem(last=False)
    else:
        states.move_to_end(key)
    variant.installer.install(state)


def translate(origin: Variant, key: SlotKey, target: Variant) -> Optional[SlotKey]:
    """``key`` (a node of ``origin``'s graph) as the node with the same identity in ``target``'s."""
    graph_path, node, keys = key
    origin_ids, target_ids = _identities(origin).get(graph_path), _identities(target).get(graph_path)
    if origin_ids is None or target_ids is None or node not in origin_ids[0]:
        return None
    name = target_ids[1].get(origin_ids[0][node])
    return None if name is None else (graph_path, name, keys)


def _identities(variant: Variant) -> Dict[str, Tuple[Dict[str, _Identity], Dict[_Identity, str]]]:
    """Per graph path: node name -> identity, and identity -> node name."""
    cached = variant.__dict__.get("_identities")
    if cached is not None:
        return cast(Dict[str, Tuple[Dict[str, _Identity], Dict[_Identity, str]]], cached)
    out: Dict[str, Tuple[Dict[str, _Identity], Dict[_Identity, str]]] = {}

    def walk(graph: Any, path: str) -> None:
        by_name: Dict[str, _Identity] = {}
        by_id: Dict[_Identity, str] = {}
        seen: Dict[_Identity, int] = {}
        for nd in graph.nodes:
            if nd.op in ("call_function", "call_method"):
                base = (nd.op, nd.target, nd.meta.get("source", ""))
                k = seen.get(base, 0)
                seen[base] = k + 1
                ident: _Identity = base + (k,)
            else:
                ident = (nd.op, nd.name)
            by_name[nd.name] = ident
            by_id[ident] = nd.name
        out[path] = (by_name, by_id)
        for child in graph.children:
            walk(child, f"{path}.{child.name}" if path else child.name)

    walk(variant.artifact.root, "")
    variant.__dict__["_identities"] = out
    return out


__all__ = ["PathResolver", "StackEntry", "Variant", "active_patches", "forget", "leave", "patch_lists", "sync", "translate"]
