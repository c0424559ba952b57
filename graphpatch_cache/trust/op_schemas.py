"""Operator signatures: does a node's argument list fit its target's schema?

From torch's operator schemas (aten operators, Tensor methods) or Python's ``inspect``
signatures; only the *kinds* of arguments matter (a float or string where torch parses an
integer does not fit). Used by the loader (:mod:`.validate`) and the write rules
(:mod:`.writes`).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

from .. import _compat
from .allowlist import listed_operator_schemas

class _Sig:
    """What a call may pass: positional names (in order), keyword-only names, required names,
    and whether one list parameter accepts its elements as varargs (``x.view(2, 3)``)."""

    __slots__ = ("positional", "keyword_only", "required", "varargs_at", "var_positional", "var_keyword", "ints")

    def __init__(self, positional: List[str], keyword_only: List[str], required: Set[str],
                 varargs_at: Optional[int] = None, var_positional: bool = False, var_keyword: bool = False,
                 ints: FrozenSet[str] = frozenset()) -> None:
        self.positional, self.keyword_only, self.required = positional, keyword_only, required
        self.varargs_at, self.var_positional, self.var_keyword = varargs_at, var_positional, var_keyword
        self.ints = ints  # parameters torch parses as integers (sizes, dims; also dtypes): no float or str


def kind(v: Any) -> str:
    """``"x"`` for a literal that no integer parameter takes (a float, complex or string, or a
    list holding one), ``"."`` for anything else (ints, nodes, dtypes, None...)."""
    if isinstance(v, str):
        return "x"
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag in ("f", "c"):
            return "x"
        if tag in ("t", "l", "size") and isinstance(x, list) and any(kind(i) == "x" for i in x):
            return "x"
    return "."


def signature_fits(sig: _Sig, kinds: Tuple[str, ...], kwkinds: Tuple[Tuple[str, str], ...]) -> bool:
    nargs = len(kinds)
    if nargs <= len(sig.positional):
        given = list(zip(sig.positional, kinds))
    elif sig.var_positional or sig.varargs_at is not None:
        # the extra positionals are the list's elements (or *args)
        given = list(zip(sig.positional, kinds))
        if sig.varargs_at is not None and sig.positional[sig.varargs_at] in sig.ints and "x" in kinds[len(sig.positional):]:
            return False
    else:
        return False
    names = set(sig.positional) | set(sig.keyword_only)
    taken = {name for name, _ in given}
    for k, kind in kwkinds:
        if k in taken or (k not in names and not sig.var_keyword):
            return False
    if any(kind == "x" and name in sig.ints for name, kind in given + list(kwkinds)):
        return False
    return sig.required <= taken | {k for k, _ in kwkinds}


_SIGS: Dict[Tuple[str, str], Optional[List[_Sig]]] = {}


def _from_schema(schema: Any) -> _Sig:
    positional: List[str] = []
    keyword_only: List[str] = []
    required: Set[str] = set()
    ints: Set[str] = set()
    varargs_at = None
    for arg in schema.arguments:
        (keyword_only if arg.kwarg_only else positional).append(arg.name)
        if not arg.has_default_value() and not str(arg.type).startswith("Optional") and not str(arg.type).endswith("?"):
            required.add(arg.name)
        type_text = str(arg.type)
        if varargs_at is None and not arg.kwarg_only and (type_text.endswith("[]") or type_text.startswith("List[")):
            varargs_at = len(positional) - 1
        if type_text in _INT_TYPES:
            ints.add(arg.name)
    # Python's argument parser lets the last positional int list take varargs
    if varargs_at is not None and varargs_at != len(positional) - 1:
        varargs_at = None
    return _Sig(positional, keyword_only, required, varargs_at, ints=frozenset(ints))


_INT_TYPES = frozenset({"int", "SymInt", "Optional[int]", "List[int]", "Optional[List[int]]", "int[]", "SymInt[]",
                        "int?", "SymInt?", "int[]?", "SymInt[]?"})


def _from_inspect(sig: inspect.Signature) -> _Sig:
    positional, keyword_only, required = [], [], set()
    var_positional = var_keyword = False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
        elif p.kind == p.KEYWORD_ONLY:
            keyword_only.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            var_positional = True
        else:
            var_keyword = True
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            required.add(p.name)
    return _Sig(positional, keyword_only, required, None, var_positional, var_keyword)


def _aten_schemas(name: str) -> List[_Sig]:
    # ".out" overloads take out=, which is refused anyway
    return [_from_schema(s) for s in schemas_for(name) if not s.overload_name.endswith("out")]


def method_signatures(name: str) -> Optional[List[_Sig]]:
    key = ("method", name)
    if key not in _SIGS:
        sigs = _aten_schemas(name)
        _SIGS[key] = sigs or None
    return _SIGS[key]


def function_signatures(name: str, fn: Any) -> Optional[List[_Sig]]:
    key = ("function", name)
    if key in _SIGS:
        return _SIGS[key]
    sigs: Optional[List[_Sig]] = None
    listed = listed_operator_schemas(name)
    if listed is not None:  # reviewed, whether or not this process registered the operator
        sigs = [_from_schema(s) for s in listed]
    elif _compat.is_op_overload(fn) or _compat.is_op_overload_packet(fn):
        sigs = [_from_schema(s) for s in _compat.op_schemas(fn)]
    else:
        try:
            sigs = [_from_inspect(inspect.signature(fn))]
        except (TypeError, ValueError):
            builtin = aten_name(fn)
            sigs = _aten_schemas(builtin) if builtin else None
            sigs = sigs or None
    _SIGS[key] = sigs
    return sigs


def schemas_for(name: str) -> List[Any]:
    """Torch's schemas of ``aten::name``."""
    return _compat.operator_schemas(f"aten::{name}")


def aten_name(fn: Any) -> Optional[str]:
    """The aten operator a Python-visible torch builtin is (``torch.add`` -> ``add``), or None."""
    found = _compat.find_builtin(fn)
    return found.split("::", 1)[1] if isinstance(found, str) and found.startswith("aten::") else None


__all__ = ["aten_name", "function_signatures", "kind", "method_signatures", "schemas_for", "signature_fits"]
