"""Patches: small callables that see (and may replace) the value at one graph node.

A patch receives the current value and returns the value the graph continues with. Patches
never mutate their input: the built-in ones write only into copies, and a patch with
``requires_clone=True`` (the default for :class:`CustomPatch` and for your own subclasses)
receives a clone of the value, so an in-place op inside it never writes into the model's
weights or the caller's tensors, with grad on or off; autograd flows through the clone.

Write your own patch as a keyword-only dataclass deriving from :class:`Patch` and override
:meth:`Patch.op` (graphpatch's name) or :meth:`Patch.apply` (ours); both work::

    @dataclass(kw_only=True)
    class ScalePatch(Patch[torch.Tensor]):
        scale: float

        def op(self, value):
            return value * self.scale

Which one runs: the one that the most derived class defining either of them defines; a
class that defines both runs ``apply`` (which may call ``self.op``). So a subclass of a
built-in patch that overrides ``op`` or ``apply`` replaces the built-in behaviour, and
``super().op(value)`` / ``super().apply(value)`` reach the built-in one.
"""

from __future__ import annotations

import functools
from types import EllipsisType
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, List, Optional, TypeVar, Union

import torch

from . import _compat

PatchTarget = TypeVar("PatchTarget")
#: one index element (graphpatch's ``TensorSliceElement``)
SliceElement = Union[int, slice, torch.Tensor, None, EllipsisType]
#: anything valid inside ``tensor[...]``: an element, a tuple of them, or a list (see
#: :func:`tensor_index` for what a list means)
SliceSpec = Any
#: the values the built-in patches handle
PatchableValue = Union[torch.Tensor, float, int, bool]

# torch (< 2.9 at least, with a deprecation warning since 2.x) reads a list that holds a slice,
# Ellipsis, None, a tensor or a sequence as a tuple of indices, and a list of plain ints as
# one advanced index. graphpatch passes a slice list straight to torch, so that legacy rule is
# what a graphpatch user's `slice=[slice(None), 0]` means; apply it ourselves so the meaning
# does not change when torch drops it. torch only applies it to lists shorter than 32.
_LEGACY_SEQUENCE_LIMIT = 32


def tensor_index(index: SliceSpec) -> SliceSpec:
    """``index`` as torch should see it: a list of index elements (``[slice(None), 0]``)
    becomes a tuple (``t[:, 0]``), as graphpatch users' list-form slices mean; a list of
    plain ints stays a list (advanced indexing: ``t[[0, 2]]`` picks rows 0 and 2)."""
    if isinstance(index, list) and len(index) < _LEGACY_SEQUENCE_LIMIT:
        if any(item is None or item is Ellipsis or isinstance(item, (slice, torch.Tensor, list, tuple))
               for item in index):
            return tuple(index)
    return index


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (containers rebuilt around them)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return _compat.tree_map(lambda v: fn(v) if isinstance(v, torch.Tensor) else v, value)


def clone_tensors(value: Any) -> Any:
    """``value`` with every tensor in it cloned (containers rebuilt around the clones)."""
    return _map_tensors(torch.Tensor.clone, value)


def _detached_copy(value: Any) -> Any:
    """What the recording patches keep: every tensor detached and copied."""
    return _map_tensors(lambda t: t.detach().clone(), value)


@functools.lru_cache(maxsize=None)
def _entry_point(cls: type) -> Optional[str]:
    """``"apply"`` or ``"op"``: the method the most derived class defining one of them defines
    (``apply`` where a class defines both); None where no class below Patch defines either."""
    for klass in cls.__mro__:
        if klass is Patch:
            return None
        if "apply" in klass.__dict__:
            return "apply"
        if "op" in klass.__dict__:
            return "op"
    return None


@dataclass(kw_only=True)
class Patch(Generic[PatchTarget]):
    """Base class of patches; generic in the value type (``Patch[torch.Tensor]``).

    Derive a keyword-only dataclass and override :meth:`op` (graphpatch's override point) or
    :meth:`apply`; see the module docstring for which runs when a class hierarchy defines both.

    :ivar requires_clone: give the patch a clone of the value (every tensor in it), so it may
        write in place without touching weights or the caller's tensors. On by default for
        your subclasses; the built-in patches that never write in place turn it off.
        (graphpatch accepts it in the constructor of ``CustomPatch`` only; we accept it on
        every patch.)
    """

    requires_clone: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> "Patch[Any]":
        # like an abstract class: refuse at construction, so `pg.patch` never sees a patch
        # that could only fail inside the forward pass
        if _entry_point(cls) is None:  # type: ignore[arg-type]  # (a class hashes by identity)
            raise NotImplementedError(_abstract_message(cls))
        return super().__new__(cls)

    def op(self, value: PatchTarget) -> PatchTarget:
        """The operation: takes the node's value, returns the value the graph continues with."""
        if _overrides(type(self), "apply"):
            return self.apply(value)
        raise NotImplementedError(_abstract_message(type(self)))

    def apply(self, value: PatchTarget) -> PatchTarget:
        """The same as :meth:`op` (this library's original name for it)."""
        if _overrides(type(self), "op"):
            return self.op(value)
        raise NotImplementedError(_abstract_message(type(self)))

    def __call__(self, value: Any) -> Any:
        entry = _entry_point(type(self))  # type: ignore[arg-type]  # (a class hashes by identity)
        if entry is None:
            raise NotImplementedError(_abstract_message(type(self)))
        if self.requires_clone:
            value = clone_tensors(value)
        return self.apply(value) if entry == "apply" else self.op(value)


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(Patch, name)


def _abstract_message(cls: type) -> str:
    return (f"{cls.__name__} defines neither op(value) nor apply(value): a patch must override "
            "one of them (Patch() itself is not a pass-through; use ProbePatch or "
            "CustomPatch(custom_op=lambda v: v) for one)")


def _write_slice(value: torch.Tensor, index: SliceSpec, update: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    index = tensor_index(index)
    out = value.clone()
    out[index] = update(out[index])
    return out


class PatchValueError(ValueError):
    """A built-in patch's value does not fit the node's value; ``hint`` says how to fix it
    (the patch slot turns this into a :class:`~graphpatch_cache.errors.PatchError` naming
    the node)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _addable(node: torch.Tensor, value: Any) -> None:
    """Whether ``node + value`` can stay in ``node``'s dtype and device the way graphpatch's
    in-place ``node[slice] += value`` can: a float value onto an integer node (or a complex one
    onto a real node) would lose its fraction, and a value on another device does not add
    (torch lets a 0-dim CPU tensor join any device). Refused as torch refuses the in-place add,
    with the node's dtype and device named and the fix."""
    if isinstance(value, torch.Tensor) and value.device != node.device and not (
            value.dim() == 0 and value.device.type == "cpu"):
        raise PatchValueError(f"its value is on {value.device}, the node's value on {node.device}",
                              hint=f"put the value on the node's device: value.to({str(node.device)!r})")
    try:
        result = torch.result_type(node, value)
    except TypeError:
        return  # not a number or tensor: torch's own error on adding says what it is
    if not torch.can_cast(result, node.dtype):
        raise PatchValueError(
            f"adding a {_dtype_name(value)} value to a {node.dtype} node gives {result}, which "
            f"the node cannot hold (graphpatch's in-place add refuses it too)",
            hint=f"pass a value of the node's dtype: value.to({node.dtype})")


def _dtype_name(value: Any) -> str:
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


def _same_shape_and_dtype(result: torch.Tensor, value: torch.Tensor, what: str) -> torch.Tensor:
    """Like graphpatch's in-place write: the node keeps its shape and dtype."""
    if result.shape != value.shape:
        raise ValueError(f"{what} of shape {tuple(result.shape)} for a value of shape {tuple(value.shape)}: "
                         "it would change the node's shape")
    return result.to(value.dtype)


@dataclass(kw_only=True)
class ProbePatch(Patch[PatchableValue]):
    """Records the last value seen in ``activation``, detached, as nothing can change it after
    the call; passes it through. That is a copy, except for a tensor the call made and nothing
    outside it sees (see ``graphpatch_cache.runtime.ownership``): then it is that tensor, and
    the activations of a node and of its views may share storage (clone one before writing
    into it in place)."""

    requires_clone: bool = False  # never writes into its input
    activation: Any = field(default=None, repr=False)

    def op(self, value: Any) -> Any:
        self.activation = _detached_copy(value)
        return value

    def _tensor_op(self, value: torch.Tensor) -> torch.Tensor:
        """:meth:`op` for a plain tensor (what a patch slot calls when it can)."""
        self.activation = value.detach().clone()
        return value

    def _tensor_op_owned(self, value: torch.Tensor) -> torch.Tensor:
        """:meth:`op` for a plain tensor that nothing can change after the call: made during it,
        seen by nothing outside it, in graphs that write nothing in place (what a patch slot
        calls when it knows that; see ``graphpatch_cache.runtime.ownership``)."""
        self.activation = value.detach()
        return value

    _looks_only = True  # returns its value untouched

@dataclass(kw_only=True)
class RecordPatch(Patch[PatchableValue]):
    """Appends a detached copy of every value seen to ``activations``; passes it through."""

    requires_clone: bool = False  # never writes into its input
    activations: List[Any] = field(default_factory=list, repr=False)

    def op(self, value: Any) -> Any:
        self.activations.append(_detached_copy(value))
        return value

    _looks_only = True  # returns its value untouched


@dataclass(kw_only=True)
class ZeroPatch(Patch[PatchableValue]):
    """Replaces the value (or ``value[slice]``) with zeros."""

    requires_clone: bool = False  # never writes into its input
    slice: Optional[SliceSpec] = None

    def op(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            if self.slice is not None:
                raise TypeError(f"a slice needs a tensor value, got {type(value).__name__}")
            return type(value)(0)
        if self.slice is None:
            return torch.zeros_like(value)
        return _write_slice(value, self.slice, torch.zeros_like)


@dataclass(kw_only=True)
class AddPatch(Patch[PatchableValue]):
    """Adds ``value`` to the node's value (or to ``value[slice]``); a tensor node keeps its
    shape and dtype (``value`` broadcasts into it, and the sum is cast back to the node's
    dtype, as graphpatch's in-place ``+=`` does: a float64 value on a float32 node gives a
    float32 node). A value the node's dtype cannot hold (a float onto an integer node) or on
    another device is refused with a :class:`~graphpatch_cache.errors.PatchError` naming the
    node, both dtypes or devices and the fix."""

    requires_clone: bool = False  # never writes into its input
    value: Any
    slice: Optional[SliceSpec] = None

    def op(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            _addable(value, self.value)
        if self.slice is None:
            if isinstance(value, torch.Tensor):
                return _same_shape_and_dtype(value + self.value, value, "the sum")
            return value + self.value
        return _write_slice(value, self.slice, lambda part: part + self.value)


@dataclass(kw_only=True)
class ReplacePatch(Patch[PatchableValue]):
    """Replaces the node's value (or ``value[slice]``) with ``value``. A tensor node keeps its
    dtype and device; ``value`` may broadcast into its shape (a number fills it), but never
    changes it."""

    requires_clone: bool = False  # never writes into its input
    value: Any
    slice: Optional[SliceSpec] = None

    def op(self, value: Any) -> Any:
        if self.slice is not None:
            return _write_slice(value, self.slice, lambda part: torch.as_tensor(self.value).to(part).expand_as(part))
        if not isinstance(value, torch.Tensor):
            # a copy, so later in-place ops in the model never write into the caller's tensor
            return self.value.clone() if isinstance(self.value, torch.Tensor) else self.value
        new = torch.as_tensor(self.value, device=value.device)
        try:
            expanded = new.expand_as(value)
        except RuntimeError:
            raise ValueError(f"replacement of shape {tuple(new.shape)} for a value of shape "
                             f"{tuple(value.shape)}: it does not broadcast to the node's shape") from None
        # clone: later in-place ops in the model never write into the caller's tensor
        return expanded.to(value.dtype).clone()


@dataclass(kw_only=True)
class CustomPatch(Patch[PatchTarget]):
    """Calls ``custom_op(value)`` and continues with what it returns. ``custom_op`` gets a
    clone (``requires_clone=True``), so it may modify it in place; pass
    ``requires_clone=False`` for an op that never does, to save the copy."""

    custom_op: Callable[[Any], Any]

    def op(self, value: Any) -> Any:
        return self.custom_op(value)


#: the types, as node metadata names them, of values that are Python numbers (sizes, flags)
NUMBER_KINDS = frozenset({"int", "SymInt", "float", "SymFloat", "bool", "SymBool"})


def number_refusal(patch: Patch[Any], kind: str) -> Optional[str]:
    """Why ``patch`` may not apply to a node whose value is a Python number of ``kind`` (one
    of :data:`NUMBER_KINDS`, such as a batch size ``int``); None when it may.

    - ProbePatch, RecordPatch (they only look), CustomPatch and your own patches (your code
      sees the value) apply to any value.
    - ZeroPatch does not: zeroing a size or a flag is no activation patch, and would fail
      only later, far from the patch (``shape '[0, 8, 64]' is invalid``).
    - ReplacePatch and AddPatch apply with a value that is no tensor and no ``slice``: an
      explicit, deliberate change of a Python value (``ReplacePatch(value=4)``; what the
      model makes of it is the caller's choice). A tensor there would turn a size into a
      tensor, so it is refused.

    A subclass of a built-in patch that overrides ``op`` or ``apply`` counts as your own.
    """
    cls: type = type(patch)  # (as ``type``: mypy takes a Patch class's __hash__ for an instance's)
    entry = _entry_point(cls)
    owner = next(k for k in cls.__mro__ if entry in k.__dict__)
    if owner is ZeroPatch:
        return "ZeroPatch applies to tensors only"
    if owner not in (AddPatch, ReplacePatch):
        return None
    if getattr(patch, "slice", None) is not None:
        return f"{owner.__name__} with a slice applies to tensors only"
    value = getattr(patch, "value", None)
    if any(isinstance(leaf, torch.Tensor) for leaf in _compat.tree_flatten(value)[0]):
        return f"{owner.__name__} brings a tensor, and a {kind} node holds a Python number"
    return None


__all__ = [
    "AddPatch",
    "CustomPatch",
    "NUMBER_KINDS",
    "Patch",
    "PatchTarget",
    "PatchValueError",
    "PatchableValue",
    "ProbePatch",
    "RecordPatch",
    "ReplacePatch",
    "SliceSpec",
    "ZeroPatch",
    "clone_tensors",
    "number_refusal",
    "tensor_index",
]
