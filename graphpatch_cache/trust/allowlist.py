"""The closed allowlist: exactly which call targets, Tensor methods and attributes a graph may name.

The list is data, ``cache_schema/allowlist-v1.json``, reviewed like code and shipped in the
wheel; ``scripts/allowlist_candidates.py`` regenerates a candidate list from the graphs our
test models produce, so an op that a new transformers release emits is a one-line addition.
Nothing is ever allowed by module or namespace prefix: a name is on the list, or it is a
function a user registered with :func:`register_target`, or it is refused.

Names on the list are resolved to callables here, from *our* list, never from an artifact's
text: resolving a listed name imports only the torch/stdlib module the reviewed entry names.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import keyword
import re
import types
from importlib import resources
from typing import Any, Callable, Dict, FrozenSet, List, Optional

import torch

from .. import _compat
from ..errors import DisallowedTargetError
from ..artifact.names import qualname

ALLOWLIST_FILE = "allowlist-v1.json"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

_REGISTERED: Dict[str, Callable[..., Any]] = {}
_RESOLVED: Dict[str, Any] = {}


_TEXT = resources.files("graphpatch_cache.cache_schema").joinpath(ALLOWLIST_FILE).read_text()
#: sha256 of the reviewed list's text: part of what a "validated" record is kept under
ALLOWLIST_DIGEST = hashlib.sha256(_TEXT.encode()).hexdigest()


def _load() -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads(_TEXT)
    if data.get("format") != "graphpatch-cache-allowlist" or data.get("version") != 1:
        raise ImportError(f"graphpatch_cache: {ALLOWLIST_FILE} is not an allowlist of version 1")
    return data


_DATA = _load()
#: qualified names of call targets (``call_function``), exactly as artifacts store them
FUNCTIONS: FrozenSet[str] = frozenset(_DATA["functions"])
#: ``torch.Tensor`` methods (``call_method``)
METHODS: FrozenSet[str] = frozenset(_DATA["methods"])
#: attribute names ``builtins.getattr`` may read, as literal strings only
ATTRIBUTES: FrozenSet[str] = frozenset(_DATA["attributes"])


#: operators of libraries other than torch on the list, each with its reviewed schema: the
#: loader's checks read calls of one against this schema (a process that has not registered
#: it can still check an artifact, as ``graphpatch-cache verify`` does), and resolving one
#: refuses an operator registered under the name with any other schema
OPERATOR_SCHEMAS: Dict[str, str] = {
    # transformers' grouped matmul for Mixture-of-Experts layers (transformers.integrations.moe,
    # registered when a MoE model's module is imported): one torch.mm per expert into a new tensor
    "torch.ops.transformers.grouped_mm_fallback":
        "transformers::grouped_mm_fallback(Tensor input, Tensor weight, Tensor offs) -> Tensor",
}
_PARSED: Dict[str, List[Any]] = {}


def listed_operator_schemas(name: str) -> Optional[List[Any]]:
    """The reviewed schemas of a listed operator of another library (None for other names)."""
    text = OPERATOR_SCHEMAS.get(name)
    if text is None:
        return None
    if name not in _PARSED:
        _PARSED[name] = [_compat.parse_schema(text)]
    return _PARSED[name]


def is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__") and len(name) > 4


def valid_dotted(name: Any) -> bool:
    """A dotted name of identifiers without dunders (``torch.nn.functional.linear``)."""
    return isinstance(name, str) and bool(_DOTTED.fullmatch(name)) and not any(
        is_dunder(part) or keyword.iskeyword(part) for part in name.split("."))


def register_target(fn: Callable[..., Any], name: Optional[str] = None) -> Callable[..., Any]:
    """Allow graphs to call ``fn`` (also usable as a decorator).

    Register your own functions before loading artifacts that call them; a function that is
    neither registered nor on the shipped list is refused at load time. Register only
    functions that are safe for any arguments an artifact may give them: tensors, numbers,
    strings and containers of those.

    :raises DisallowedTargetError: ``name`` is not a dotted identifier name, or names an
        entry of the shipped list (which cannot be replaced).
    """
    key = name or qualname(fn)
    if not valid_dotted(key):
        raise DisallowedTargetError(f"cannot register {fn!r} under {key!r}: not a dotted name of identifiers",
                                    target=key, hint="pass name='package.module.function'")
    if key in FUNCTIONS and not key.startswith("graphpatch_cache.") and _resolve_listed(key) is not fn:
        raise DisallowedTargetError(f"{key!r} is on the shipped allowlist and cannot be re-registered", target=key)
    _REGISTERED[key] = fn
    _RESOLVED.pop(key, None)
    return fn


def function_allowed(name: str) -> bool:
    """Whether artifacts may call ``name`` (on the list, or registered)."""
    return name in _REGISTERED or (name in FUNCTIONS and not name.startswith("graphpatch_cache."))


def method_allowed(name: str) -> bool:
    return name in METHODS


def attribute_allowed(name: str) -> bool:
    return name in ATTRIBUTES


def _refusal(name: str, node_path: str, why: str, hint: str = "") -> DisallowedTargetError:
    where = f" at node {node_path}" if node_path else ""
    return DisallowedTargetError(
        f"refusing call target {name!r}{where}: {why}",
        node_path=node_path,
        target=str(name),
        hint=hint or "graphs may call only the targets in graphpatch_cache's allowlist (cache_schema/"
        f"{ALLOWLIST_FILE}) and functions registered with graphpatch_cache.register_target; "
        "do not load artifacts you do not trust",
    )


def resolve_function(name: Any, *, node_path: str = "") -> Any:
    """The callable an allowed ``call_function`` target (or ``fn`` value) names.

    :raises DisallowedTargetError: ``name`` is not on the list and not registered; nothing
        is imported or called.
    """
    if not isinstance(name, str) or not name:
        raise _refusal(str(name), node_path, "not a name")
    if name in _REGISTERED:
        return _REGISTERED[name]
    if not function_allowed(name):
        raise _refusal(name, node_path, "not on the allowlist")
    try:
        fn = _resolve_listed(name)
    except AttributeError:
        # a listed custom operator (torch.ops.transformers.*) exists only once the library that
        # defines it has registered it; we never import that library for an artifact
        raise _refusal(name, node_path, "an operator not registered in this process",
                       hint="import the library that defines it before loading (transformers registers "
                       "torch.ops.transformers.* when a Mixture-of-Experts model's module is imported)") from None
    if name in OPERATOR_SCHEMAS and [str(s) for s in _compat.op_schemas(fn)] != [OPERATOR_SCHEMAS[name]]:
        raise _refusal(name, node_path, "an operator registered with another schema than the reviewed "
                       f"{OPERATOR_SCHEMAS[name]!r}")
    return fn


def function_for_checks(name: Any, *, node_path: str = "") -> Any:
    """What the loader's checks inspect for a ``call_function`` target: :func:`resolve_function`'s
    callable, or None for a listed operator of another library that this process has not
    registered (its reviewed schema, :func:`listed_operator_schemas`, stands in).

    :raises DisallowedTargetError: as :func:`resolve_function` does otherwise.
    """
    if isinstance(name, str) and name in OPERATOR_SCHEMAS and name in FUNCTIONS:
        namespace, _, op = name[len("torch.ops."):].partition(".")
        if not hasattr(getattr(torch.ops, namespace), op):
            return None
    return resolve_function(name, node_path=node_path)


def _resolve_listed(name: str) -> Any:
    """Resolve a name from the *shipped* list (trusted data): import its torch/stdlib module."""
    fn = _RESOLVED.get(name)
    if fn is not None:
        return fn
    parts = name.split(".")
    if parts[:2] == ["torch", "ops"]:
        obj: Any = torch.ops
        for part in parts[2:]:
            obj = getattr(obj, part)
    else:
        obj = None
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for part in parts[cut:]:
                obj = getattr(obj, part)
            break
        if obj is None:
            raise ImportError(name)
    _RESOLVED[name] = obj
    return obj


def check_method(name: Any, *, node_path: str = "") -> str:
    """Accept a ``call_method`` name only if it is on the list of Tensor methods.

    :raises DisallowedTargetError: naming the node and the method.
    """
    if not isinstance(name, str) or not method_allowed(name):
        raise DisallowedTargetError(
            f"refusing method call {name!r} at node {node_path}: not an allowed torch.Tensor method",
            node_path=node_path,
            target=str(name),
            hint=f"graphs may call only the Tensor methods in cache_schema/{ALLOWLIST_FILE}",
        )
    return name


# -- naming (extraction) -----------------------------------------------------------------------
_TORCH_HOMES = ("torch", "torch.nn.functional", _compat.TORCH_NN_BUILTINS, "torch.linalg", "torch.fft", "torch.special")


def _find_torch_home(fn: Any) -> Optional[str]:
    name = getattr(fn, "__name__", None)
    for module_name in _TORCH_HOMES:
        module = importlib.import_module(module_name)
        if name and getattr(module, name, None) is fn:
            return module_name
    return None


def candidate_name(fn: Any) -> Optional[str]:
    """The name under which ``fn`` would be stored (before asking whether it is allowed)."""
    for key, registered in _REGISTERED.items():
        if registered is fn:
            return key
    if _compat.is_op_overload_packet(fn) or _compat.is_op_overload(fn):
        return _compat.op_name(fn)
    if getattr(fn, "__name__", None) in vars(builtins) and vars(builtins)[fn.__name__] is fn:
        return f"builtins.{fn.__name__}"
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        home = _find_torch_home(fn)
        if home is not None:
            module, qual = home, fn.__name__
    if module is None:
        module = _find_torch_home(fn)  # torch builtins defined in C have no module
    if module is None or qual is None:
        return None
    if module in _compat.TORCH_VARIABLE_FUNCTIONS or (module == "torch.functional" and getattr(torch, qual, None) is fn):
        module = "torch"  # torch re-exports torch.functional's functions (torch.split) under its own name
    return f"{module}.{qual}"


def target_name(fn: Any) -> str:
    """The name under which ``fn`` is stored; it must be allowed and resolve back to ``fn``.

    :raises DisallowedTargetError: ``fn`` cannot be named or is not allowed (extraction then
        keeps the module opaque).
    """
    name = candidate_name(fn)
    if name is None:
        raise DisallowedTargetError(f"cannot name call target {fn!r}", target=repr(fn))
    if resolve_function(name) is not fn:
        raise DisallowedTargetError(f"call target {name} does not resolve back to the same function", target=name)
    return name


__all__ = [
    "ALLOWLIST_DIGEST", "ATTRIBUTES", "FUNCTIONS", "METHODS", "OPERATOR_SCHEMAS", "attribute_allowed", "candidate_name",
    "check_method", "function_allowed", "function_for_checks", "is_dunder", "listed_operator_schemas", "method_allowed",
    "register_target", "resolve_function", "target_name", "valid_dotted",
]
