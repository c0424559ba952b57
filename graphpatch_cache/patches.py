"""Patches: small callables that see (and may replace) the value at one graph node.

A patch receives the current value and returns the value the graph continues with. Patches
never mutate their input: they clone before writing, so the model's weights and the caller's
tensors are untouched, and autograd flows through patch values.

Subclass :class:`Patch` and implement :meth:`Patch.apply` for your own patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

SliceSpec = Any  # anything valid inside ``tensor[...]``: int, slice, tuple of those, Ellipsis


@dataclass(kw_only=True)
class Patch:
    """Base class. ``apply(value)`` returns the replacement value.

    :ivar slice: optional index expression; the patch then acts on ``value[slice]`` only.
    """

    def apply(self, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, value: Any) -> Any:
        return self.apply(value)


def _write_slice(value: torch.Tensor, index: SliceSpec, update: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    out = value.clone()
    out[index] = update(out[index])
    return out


@dataclass(kw_only=True)
class ProbePatch(Patch):
    """Records a detached copy of the last value seen in ``activation``; passes it through."""

    activation: Any = field(default=None, repr=False)

    def apply(self, value: Any) -> Any:
        self.activation = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return value


@dataclass(kw_only=True)
class RecordPatch(Patch):
    """Appends a detached copy of every value seen to ``activations``; passes it through."""

    activations: List[Any] = field(default_factory=list, repr=False)

    def apply(self, value: Any) -> Any:
        self.activations.append(value.detach().clone() if isinstance(value, torch.Tensor) else value)
        return value


@dataclass(kw_only=True)
class ZeroPatch(Patch):
    """Replaces the value (or ``value[slice]``) with zeros."""

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

    value: Any
    slice: Optional[SliceSpec] = None

    def apply(self, value: Any) -> Any:
        if self.slice is None:
            return value + self.value
        return _write_slice(value, self.slice, lambda part: part + self.value)


@dataclass(kw_only=True)
class ReplacePatch(Patch):
    """Replaces the node's value (or ``value[slice]``) with ``value``."""

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
    """Calls ``custom_op(value)`` and continues with what it returns."""

    custom_op: Callable[[Any], Any]

    def apply(self, value: Any) -> Any:
        return self.custom_op(value)


__all__ = ["AddPatch", "CustomPatch", "Patch", "ProbePatch", "RecordPatch", "ReplacePatch", "ZeroPatch"]
