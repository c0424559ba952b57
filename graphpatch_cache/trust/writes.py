"""What a graph node writes into, and whether its result may alias an input.

The rules the loader (:mod:`.validate`: no write into a parameter) and binding
(:mod:`graphpatch_cache.runtime.guards`: the call-time guard) share: in-place Tensor methods
(``add_``), ``operator.iadd``/``setitem``, ops whose torch schema marks an argument as
written, ``inplace=True``, ``F.embedding(max_norm=...)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _compat
from .allowlist import OPERATOR_SCHEMAS, listed_operator_schemas
from .op_schemas import aten_name, schemas_for

_INPLACE_OPERATORS = frozenset({"_operator.iadd", "_operator.isub", "_operator.imul", "_operator.itruediv",
                                "_operator.ifloordiv", "_operator.imod", "_operator.ipow", "_operator.iand",
                                "_operator.ior", "_operator.ixor", "_operator.ilshift", "_operator.irshift",
                                "_operator.imatmul", "_operator.setitem"})
#: operator functions whose trailing underscore only avoids a keyword: ``a & b`` writes nothing
_KEYWORD_NAMES = frozenset({"_operator.and_", "_operator.or_", "_operator.not_", "_operator.is_"})
#: ops that return (part of) their input: their results may alias a parameter
_ALIASING_FUNCTIONS = frozenset({"_operator.getitem", "builtins.getattr", "graphpatch_cache.functions.tree_build"})

_OP_SCHEMAS: Dict[Tuple[str, str], Optional[List[Any]]] = {}
_ALIASES: Dict[Tuple[str, str], bool] = {}


def _op_schemas(op: str, name: str, fn: Any) -> Optional[List[Any]]:
    """Torch schemas of a node's target, or None when none are known (a Python function)."""
    key = (op, name)
    if key not in _OP_SCHEMAS:
        _OP_SCHEMAS[key] = _find_op_schemas(op, name, fn)
    return _OP_SCHEMAS[key]


def _find_op_schemas(op: str, name: str, fn: Any) -> Optional[List[Any]]:
    if op == "call_method":
        return schemas_for(name) or None
    listed = listed_operator_schemas(name)
    if listed is not None:  # reviewed, whether or not this process registered the operator
        return listed
    if _compat.is_op_overload(fn) or _compat.is_op_overload_packet(fn):
        return _compat.op_schemas(fn)
    aten = aten_name(fn)
    return (schemas_for(aten) or None) if aten else None


def may_alias_input(op: str, name: str, fn: Any) -> bool:
    """Whether the node's result may share storage with one of its inputs."""
    key = (op, name)
    if key not in _ALIASES:
        _ALIASES[key] = _may_alias_input(op, name, fn)
    return _ALIASES[key]


def _may_alias_input(op: str, name: str, fn: Any) -> bool:
    if op == "call_function" and name in _ALIASING_FUNCTIONS:
        return True
    if op == "call_function" and name.startswith(("_operator.", "math.", "builtins.")):
        return False  # arithmetic creates new values; getitem/getattr are listed above
    schemas = _op_schemas(op, name, fn)
    if schemas is None:
        return True  # unknown: assume it may (x.float() returns x itself when already float)
    return any(_returns_an_input(s) for s in schemas)


def _returns_an_input(schema: Any) -> bool:
    """Whether a schema's result may be one of its inputs. The results of an ``out=`` overload
    (``topk.values``) alias only its keyword-only output arguments: a write into those is a
    write the rules above refuse when it reaches a parameter, so its result aliases nothing else."""
    outs = {a for arg in schema.arguments if arg.kwarg_only and arg.alias_info is not None
            and arg.alias_info.is_write for a in arg.alias_info.before_set}
    return any(ret.alias_info is not None and not set(ret.alias_info.before_set) <= outs for ret in schema.returns)


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
    if name in _INPLACE_OPERATORS or (short.endswith("_") and not short.startswith("_") and name not in _KEYWORD_NAMES):
        if args:
            out.append(args[0])
    if _compat.is_op_overload(fn) or _compat.is_op_overload_packet(fn) or name in OPERATOR_SCHEMAS:
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


_PARAM_NAMES: Dict[Any, List[str]] = {}


def _positional(fn: Any, param: str, args: Sequence[Any]) -> Any:
    """The value passed positionally for ``param`` of a Python function (None if not)."""
    if fn is None or not args:
        return None
    try:
        names = _PARAM_NAMES.get(fn)
    except TypeError:  # unhashable
        return None
    if names is None:
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            names = []
        _PARAM_NAMES[fn] = names
    return args[names.index(param)] if param in names and names.index(param) < len(args) else None


__all__ = ["may_alias_input", "written_inputs"]
