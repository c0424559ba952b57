"""A patch slot: what the code of a patched graph calls on one value, running the patches
set on that node (see :mod:`.patching` for how slots get into a graph's code)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import PatchError
from ..integrations.bitsandbytes import patch_view
from ..patches import Patch, PatchValueError


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


def apply_patches(value: Any, patches: Sequence[Patch[Any]], keys: Tuple[Any, ...], node_path: str,
                  _done: Tuple[Any, ...] = ()) -> Any:
    """Run ``patches`` in order on ``value`` (or on the part at ``keys``).

    :raises PatchError: a patch failed, or turned a tensor into one of another dtype or on
        another device (the graph after the node was traced for the node's dtype: its next op
        would fail with a bare torch error naming neither node nor patch).
    """
    if keys:
        part = _get_part(value, keys[0], node_path)
        return _set_part(value, keys[0], apply_patches(part, patches, keys[1:], node_path, _done + (keys[0],)))
    for patch in patches:
        before = value
        try:
            value = patch(value)
        except PatchError:
            raise
        except (IndexError, RuntimeError, ValueError, TypeError) as exc:
            where = getattr(patch, "slice", None)
            raise PatchError(
                f"{type(patch).__name__} at node {_full_path(node_path, _done)!r} failed on {_describe(before)}"
                + (f" with slice {where!r}" if where is not None else "")
                + f": {exc}",
                node_path=node_path,
                hint=exc.hint if isinstance(exc, PatchValueError) else "check the slice against the node's shape (pg.graph[path]._shape)",
            ) from exc
        if isinstance(before, torch.Tensor) and isinstance(value, torch.Tensor) and (
                value.dtype != before.dtype or value.device != before.device):
            raise _changed(patch, before, value, _full_path(node_path, _done), node_path)
    return value


def _full_path(node_path: str, keys: Tuple[Any, ...]) -> str:
    return node_path + "".join(f"|sub_{k}" if isinstance(k, int) else f"|{k}" for k in keys)


def _changed(patch: Patch[Any], before: torch.Tensor, after: torch.Tensor, where: str, node_path: str) -> PatchError:
    name = type(patch).__name__
    if after.dtype != before.dtype:
        return PatchError(
            f"{name} at node {where!r} turned its {before.dtype} value into a {after.dtype} one; the graph "
            f"after this node was traced for {before.dtype} (its next op would fail with a torch error "
            "such as 'mixed dtype' naming neither node nor patch)",
            node_path=node_path,
            hint=f"return a value of the node's dtype from the patch: value.to({before.dtype})")
    return PatchError(
        f"{name} at node {where!r} moved its value from {before.device} to {after.device}; the graph "
        f"after this node runs on {before.device}",
        node_path=node_path,
        hint=f"return a value on the node's device from the patch: value.to({str(before.device)!r})")


def _fast_ops(cls: type) -> Tuple[Optional[str], Optional[str]]:
    """The plain-tensor forms of a patch class's op (``_tensor_op``, and ``_tensor_op_owned``
    for a value the call owns), defined by that class itself: a subclass that overrides
    ``op`` does not inherit them."""
    known = _FAST_OPS.get(cls)
    if known is None:
        own = cls.__dict__
        known = _FAST_OPS[cls] = ("_tensor_op" if "_tensor_op" in own else None,
                                  "_tensor_op_owned" if "_tensor_op_owned" in own else None)
    return known


_FAST_OPS: Dict[type, Tuple[Optional[str], Optional[str]]] = {}


def looks_only(cls: type) -> bool:
    """Whether patches of this class return the value they are given, untouched
    (``_looks_only``, set by the class itself): while every active patch only looks, the
    values a call owns are seen by nothing outside it (see :mod:`.ownership`)."""
    return cls.__dict__.get("_looks_only", False) is True


class PatchSlot:
    """What the code of a patched graph calls on one value (``self._graphpatch_slot_N``): a
    plain object in the graph module's ``__dict__`` (``home``, under ``name``), not a
    registered module, so that entering a patch context neither builds nor registers modules.

    ``owned``: the node's value is a tensor the call owns (:mod:`.ownership`). While every
    active patch only looks (``plain``), a lone patch with an owned form of its op takes that
    form (a probe keeps the tensor instead of a copy), and the graph calls that form itself:
    it is put under the slot's name in place of the slot (:meth:`bind`)."""

    __slots__ = ("node_path", "keys", "patches", "fast", "owned", "plain", "direct", "home", "name")

    def __init__(self, node_path: str, keys: Tuple[Any, ...], owned: bool = False,
                 home: Optional[Dict[str, Any]] = None, name: str = "") -> None:
        self.node_path = node_path
        self.keys = keys
        self.owned = owned and not keys
        self.home = home
        self.name = name
        # (no patches, and not in the graph's dict: installing its skeleton binds it)
        self.patches: List[Patch[Any]] = _NO_PATCHES
        self.plain = False
        self.fast: Optional[Callable[[torch.Tensor], Any]] = None
        self.direct = False

    def bind(self) -> None:
        """Put what the graph calls under the slot's name: the owned op itself, or the slot."""
        if self.home is not None:
            self.home[self.name] = self.fast if self.direct else self

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


_NO_PATCHES: List[Patch[Any]] = []


def set_patches(slots: Sequence[Optional[PatchSlot]], lists: Sequence[List[Patch[Any]]], plain: bool,
                force: bool = False) -> None:
    """Give each slot its patch list (None: no slot) and bind it; a slot that has that list
    already, with the same ``plain``, is left as it is (bound again if ``force``). (One loop
    for every slot of a block: a patch loop sets thousands per call.)"""
    fast_ops = _FAST_OPS
    for slot, patches in zip(slots, lists):
        if slot is None:
            continue
        if slot.patches is patches and slot.plain is plain:
            if force:
                slot.bind()
            continue
        slot.patches = patches
        slot.plain = plain
        fast = None
        direct = False
        if len(patches) == 1 and not slot.keys:
            only = patches[0]
            ops = fast_ops.get(type(only)) or _fast_ops(type(only))
            direct = ops[1] is not None and plain and slot.owned
            name = ops[1] if direct else ops[0]
            if name is not None:
                fast = getattr(only, name)
        slot.fast = fast
        slot.direct = direct
        home = slot.home
        if home is not None:
            home[slot.name] = fast if direct else slot


def release(slots: Sequence[Optional[PatchSlot]]) -> None:
    """Let each slot (None: no slot) hold no patches, nor anything they hold. The graph's
    entry under a slot's name is replaced only where it is that slot's (slots of other sets
    of patched nodes use the same names). (One loop: a block releases thousands.)"""
    for slot in slots:
        if slot is None:
            continue
        home = slot.home
        if home is not None:
            name = slot.name
            bound = home.get(name)
            if bound is slot or (bound is not None and bound is slot.fast):
                home[name] = slot
        slot.patches = _NO_PATCHES
        slot.fast = None
        slot.direct = False


__all__ = ["PatchSlot", "apply_patches", "looks_only", "release", "set_patches"]
