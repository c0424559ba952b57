"""What a bound graph may not do to the live model or the process, enforced at bind and call time.

- **No write into a parameter.** A node that writes one of its inputs (in-place Tensor
  methods such as ``add_``, ``operator.iadd``/``setitem``, ops whose torch schema marks an
  argument as written, ``inplace=True``, ``F.embedding(max_norm=...)``: the rules are
  :func:`graphpatch_cache.trust.writes.written_inputs`) into a node that may alias a parameter
  is refused at load by :func:`~graphpatch_cache.trust.validate.check_artifact`, with
  :class:`~graphpatch_cache.errors.ProtectedWriteError`. Binding wraps every remaining
  writing node so that, at call time, a write into a tensor sharing storage with any of the
  model's parameters raises the same error *before* the write happens. A write into a
  tensor the graph itself created (:func:`is_fresh`: a factory such as ``new_ones`` or an
  out-of-place operator, perhaps written in place since) needs no guard. Graphs without
  other writing nodes (most models) carry no guard at all.
- **Global state is the same after every call.** :func:`preserved_global_state` restores
  grad mode, autocast and the default dtype around a call of the root graph, whatever the
  graph did.

Buffers are not protected: models update their own (BatchNorm running statistics).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence, Set

import torch

from .. import _compat
from ..errors import ProtectedWriteError
from ..trust.writes import written_inputs  # noqa: F401  (the rules, shared with the loader)

#: ops whose result is always a tensor they allocate (never one of their inputs): an explicit
#: list, as an op's schema does not say so reliably (``type_as`` and ``atleast_1d`` return
#: their input as it is when nothing needs converting, though their schemas declare no alias)
_CREATES = frozenset({
    "new_ones", "new_zeros", "new_full", "new_empty", "new_tensor", "clone",
    "torch.ones", "torch.zeros", "torch.full", "torch.empty", "torch.arange", "torch.tensor",
    "torch.ones_like", "torch.zeros_like", "torch.full_like", "torch.empty_like", "torch.clone",
    "_operator.add", "_operator.sub", "_operator.mul", "_operator.truediv", "_operator.floordiv",
    "_operator.neg", "_operator.and_", "_operator.or_", "_operator.xor", "_operator.invert",
    "_operator.eq", "_operator.ne", "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge",
})
#: in-place forms that return the tensor they wrote into
_RETURNS_WRITTEN = frozenset({"_operator.iadd", "_operator.isub", "_operator.imul", "_operator.itruediv",
                              "_operator.iand", "_operator.ior", "_operator.ixor"})


def is_fresh(op: str, name: str, written: Sequence[Any], fresh: Set[str]) -> bool:
    """Whether a node's result is a tensor the graph made itself (so never a parameter's
    storage): made by an op of ``_CREATES``, or by an in-place operator writing into such a
    tensor (``fresh`` holds the names of the graph's fresh nodes so far; ``written`` the
    node's written inputs)."""
    if op not in ("call_function", "call_method"):
        return False
    if name in _CREATES and not written:
        return True
    return name in _RETURNS_WRITTEN and len(written) == 1 and getattr(written[0], "name", None) in fresh


def param_storages(model: torch.nn.Module) -> Set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"} - {0}


def guarded(call: Callable[..., Any], positions: Sequence[int], keywords: Sequence[str], model: torch.nn.Module,
            node_path: str, target: str) -> Callable[..., Any]:
    """``call`` that first refuses to write into a tensor sharing a parameter's storage."""

    def check(value: Any) -> None:
        if isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter) or (
                value.device.type != "meta" and value.untyped_storage().data_ptr() in param_storages(model))):
            raise ProtectedWriteError(
                f"node {node_path!r} ({target}) would write into a parameter of the model; the write was refused",
                node_path=node_path, target=target,
                hint="graphs may not modify weights; this artifact computes something its model does not. "
                "Do not load artifacts you do not trust")

    def write_guard(*args: Any, **kwargs: Any) -> Any:
        for i in positions:
            if i < len(args):
                check(args[i])
        for k in keywords:
            if k in kwargs:
                check(kwargs[k])
        return call(*args, **kwargs)

    return write_guard


def method_call(name: str) -> Callable[..., Any]:
    """``call_method`` as a function (so a guard can wrap it); dispatches on the object."""

    def call(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, name)(*args, **kwargs)

    call.__name__ = f"method_{name}"
    return call


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Grad mode, autocast and the default dtype are the same after the block as before."""
    grad = torch.is_grad_enabled()
    dtype = torch.get_default_dtype()
    autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}
    try:
        yield
    finally:
        _compat.set_grad_enabled(grad)
        if torch.get_default_dtype() != dtype:
            torch.set_default_dtype(dtype)
        for device, (enabled, adtype) in autocast.items():
            if torch.is_autocast_enabled(device) != enabled:
                torch.set_autocast_enabled(device, enabled)
            if torch.get_autocast_dtype(device) != adtype:
                torch.set_autocast_dtype(device, adtype)


__all__ = ["guarded", "is_fresh", "method_call", "param_storages", "preserved_global_state", "written_inputs"]
