"""Patches: small callables that see (and may replace) the value at one graph node.

A patch receives the current value and returns the value the graph continues with. Patches
never mutate their input: the built-in ones clone before writing, and a patch with
``requires_clone=True`` (the default for :class:`CustomPatch` and for your own subclasses)
receives a clone of the value, so an in-place op inside it never writes into the model's
weights or the caller's tensors, with grad on or off; autograd flows through the clone.

Subclass :class:`Patch` and implement :meth:`Patch.apply` for your own patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

from . import _compat

SliceSpec = Any  # anything valid inside ``tensor[...]``: int, slice, tuple of those, Ellipsis


def clone_tensors(value: Any) -> Any:
    """``value`` with every tensor in it cloned (containers rebuilt around the clones)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return _compat.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


@dataclass(kw_only=True)
class Patch:
    """Base class. ``apply(value)`` returns the replacement value.

    :ivar requires_clone: give ``apply`` a clone of the value (every tensor in it), so it may
        write in place without touching weights or the caller's tensors. On by default for
        your subclasses; the built-in patches that never write in place turn it off.
    """

    requires_clone: bool = True

    def apply(self, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, value: Any) -> Any:
        return self.apply(clone_tensors(value) if self.requires_clone else value)


def _write_slice(value: torch.Tensor, index: SliceSpec, update: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    out = value.clone()
    out[index] = update(out[index])
    return out


@dataclass(kw_only=True)
class ProbePatch(Patch):
    """Records a detached copy of the last value seen in ``activation``; passes it through."""

    requires_clone: bool = False  # never writes into its input
    activation: Any = field(default=None, repr=False)

    def apply(self, value: Any) -> Any:
        self.activation = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return value


@dataclass(kw_only=True)
class RecordPatch(Patch):
    """Appends a detached copy of every value seen to ``activations``; passes it through."""

    requires_clone: bool = False  # never writes into its input
    activations: List[Any] = field(default_factory=list, repr=False)

    def apply(self, value: Any) -> Any:
        self.activations.append(value.detach().clone() if isinstance(value, torch.Tensor) else value)
        return value


@dataclass(kw_only=True)
class ZeroPatch(Patch):
    """Replaces the value (or ``value[slice]``) with zeros."""

    requires_clone: bool = False  # never writes into its input
    slice: Optional[SliceSpec] = None

    def apply(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            if self.slice is not None:
                raise TypeError(f"a slice needs a tensor value, got {type(value).__name__}")
            return type(value)(0)
        if self.slice is None:
            return torch.zeros_like(value)
        return _write_slice(value, self.slice, torch.zeros_like)


@dataclass(kw_only=True)
class AddPatch(Patch):
    """Adds ``value`` to the node's value (or to ``value[slice]``)."""

    requires_clone: bool = False  # never writes into its input
    value: Any
    slice: Optional[SliceSpec] = None

    def apply(self, value: Any) -> Any:
        if self.slice is None:
            return value + self.value
        return _write_slice(value, self.slice, lambda part: part + self.value)


@dataclass(kw_only=True)
class ReplacePatch(Patch):
    """Replaces the node's value (or ``value[slice]``) with ``value``."""

    requires_clone: bool = False  # never writes into its input
    value: Any
    slice: Optional[SliceSpec] = None

    def apply(self, value: Any) -> Any:
        if self.slice is None:
            if isinstance(value, torch.Tensor) and isinstance(self.value, torch.Tensor):
                if self.value.shape != value.shape:
                    raise ValueError(
                        f"replacement of shape {tuple(self.value.shape)} for a value of shape "
                        f"{tuple(value.shape)}"
                    )
            # a copy, so later in-place ops in the model never write into the caller's tensor
            return self.value.clone() if isinstance(self.value, torch.Tensor) else self.value
        return _write_slice(value, self.slice, lambda part: torch.as_tensor(self.value).to(part).expand_as(part))


@dataclass(kw_only=True)
class CustomPatch(Patch):
    """Calls ``custom_op(value)`` and continues with what it returns. ``custom_op`` gets a
    clone (``requires_clone=True``), so it may modify it in place; pass
    ``requires_clone=False`` for an op that never does, to save the copy."""

    custom_op: Callable[[Any], Any]

    def apply(self, value: Any) -> Any:
        return self.custom_op(value)


__all__ = ["AddPatch", "CustomPatch", "Patch", "clone_tensors", "ProbePatch", "RecordPatch", "ReplacePatch", "ZeroPatch"]
