"""What a bound graph may not do to the live model or the process, enforced at bind and call time.

- **No write into a parameter.** Binding finds every node that writes one of its inputs
  (in-place Tensor methods such as ``add_``, ``operator.iadd``/``setitem``, ops whose torch
  schema marks an argument as written, ``inplace=True``, ``F.embedding(max_norm=...)``). A
  write into a node that may alias a parameter (the parameter itself, or a view of it through
  any op not known to return a fresh tensor) is refused at bind with
  :class:`~graphpatch_cache.errors.ProtectedWriteError`. Every remaining writing node is
  wrapped so that, at call time, a write into a tensor sharing storage with any of the
  model's parameters raises the same error *before* the write happens. Graphs without
  writing nodes (most models) carry no guard at all.
- **Global state is the same after every call.** :func:`preserved_global_state` restores
  grad mode, autocast and the default dtype around a call of the root graph, whatever the
  graph did.

Buffers are not protected: models update their own (BatchNorm running statistics).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import torch
import torch.fx

from ..errors import ProtectedWriteError

_INPLACE_OPERATORS = frozenset({"_operator.iadd", "_operator.isub", "_operator.imul", "_operator.itruediv",
                                "_operator.ifloordiv", "_operator.imod", "_operator.ipow", "_operator.iand",
                                "_operator.ior", "_operator.ixor", "_operator.ilshift", "_operator.irshift",
                                "_operator.imatmul", "_operator.setitem"})
#: ops that return (part of) their input: their results may alias a parameter
_ALIASING_FUNCTIONS = frozenset({"_operator.getitem", "builtins.getattr", "graphpatch_cache.functions.tree_build"})


def _schemas_for(name: str) -> List[Any]:
    return list(torch._C._jit_get_schemas_for_operator(f"aten::{name}"))


def _aten_name(fn: Any) -> Optional[str]:
    try:
        from torch.jit._builtins import _find_builtin
    except ImportError:  # pragma: no cover - other torch versions
        return None
    found = _find_builtin(fn)
    return found.split("::", 1)[1] if isinstance(found, str) and found.startswith("aten::") else None


def _op_schemas(op: str, name: str, fn: Any) -> Optional[List[Any]]:
    """Torch schemas of a node's target, or None when none are known (a Python function)."""
    if op == "call_method":
        return _schemas_for(name) or None
    if isinstance(fn, torch._ops.OpOverload):
        return [fn._schema]
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return [getattr(fn, o)._schema for o in fn.overloads()]
    aten = _aten_name(fn)
    return (_schemas_for(aten) or None) if aten else None


def may_alias_input(op: str, name: str, fn: Any) -> bool:
    """Whether the node's result may share storage with one of its inputs."""
    if op == "call_function" and name in _ALIASING_FUNCTIONS:
        return True
    if op == "call_function" and name.startswith(("_operator.", "math.", "builtins.")):
        return False  # arithmetic creates new values; getitem/getattr are listed above
    schemas = _op_schemas(op, name, fn)
    if schemas is None:
        return True  # unknown: assume it may (x.float() returns x itself when already float)
    return any(ret.alias_info is not None for s in schemas for ret in s.returns)


def written_inputs(op: str, name: str, fn: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Any]:
    """The argument values a node writes into (the fx nodes among them matter)."""
    out: List[Any] = []
    if op == "call_method":
        if name.endswith("_") and not name.startswith("_") and args:
            out.append(args[0])
        return out
    if op != "call_function":
        return out
    short = name.rsplit(".", 1)[-1]
    if name in _INPLACE_OPERATORS or (short.endswith("_") and not short.startswith("_")):
        if args:
            out.append(args[0])
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        for schema in _op_schemas(op, name, fn) or []:
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    if arg.kwarg_only and arg.name in kwargs:
                        out.append(kwargs[arg.name])
                    elif not arg.kwarg_only and i < len(args):
                        out.append(args[i])
    inplace = kwargs.get("inplace", _positional(fn, "inplace", args))
    if inplace is not None and inplace is not False:
        out.append(args[0] if args else kwargs.get("input"))
    if name == "torch.nn.functional.embedding":
        max_norm = kwargs.get("max_norm", _positional(fn, "max_norm", args))
        if max_norm is not None:  # renormalizes the weight rows it reads, in place
            out.append(kwargs.get("weight", args[1] if len(args) > 1 else None))
    return out


def _positional(fn: Any, param: str, args: Sequence[Any]) -> Any:
    """The value passed positionally for ``param`` of a Python function (None if not)."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return args[names.index(param)] if param in names and names.index(param) < len(args) else None


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
        torch._C._set_grad_enabled(grad)
        if torch.get_default_dtype() != dtype:
            torch.set_default_dtype(dtype)
        for device, (enabled, adtype) in autocast.items():
            if torch.is_autocast_enabled(device) != enabled:
                torch.set_autocast_enabled(device, enabled)
            if torch.get_autocast_dtype(device) != adtype:
                torch.set_autocast_dtype(device, adtype)


def fx_nodes(values: Sequence[Any]) -> List[torch.fx.Node]:
    found: List[torch.fx.Node] = []
    torch.fx.node.map_arg(list(values), lambda n: found.append(n) or n)
    return found


__all__ = ["fx_nodes", "guarded", "may_alias_input", "method_call", "param_storages", "preserved_global_state",
           "written_inputs"]
