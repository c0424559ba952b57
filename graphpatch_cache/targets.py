"""Call targets as data: qualified names out, allowlisted callables in.

Artifacts may come from a shared filesystem, so loading one must never become a way to run
somebody else's code. Every ``call_function`` target is stored as a qualified name and
resolved here through an allowlist: torch's own operators (not its I/O, hub, compiler or
package machinery), ``operator``, ``math``, a few side-effect-free builtins, and functions
registered with :func:`register_target`. ``call_method`` names must be public methods of
``torch.Tensor``. Anything else raises :class:`DisallowedTargetError` before any graph runs.
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator
import types
from typing import Any, Callable, Dict

import torch

from .errors import DisallowedTargetError

_REGISTERED: Dict[str, Callable[..., Any]] = {}

#: torch namespaces whose operators graphs may call.
_TORCH_FUNCTION_MODULES = frozenset(
    {
        "torch",
        "torch.functional",
        "torch.nn.functional",
        "torch._C._nn",
        "torch._C._linalg",
        "torch._C._fft",
        "torch._C._special",
        "torch._C._VariableFunctions",
        "torch.linalg",
        "torch.fft",
        "torch.special",
    }
)
#: top-level torch callables that do I/O, load code, or change global state.
_TORCH_DENY = frozenset(
    {
        "load", "save", "from_file", "compile", "hub", "jit", "package", "library", "classes",
        "utils", "set_default_device", "set_default_dtype", "set_default_tensor_type",
        "set_num_threads", "set_num_interop_threads", "use_deterministic_algorithms",
        "set_printoptions", "set_warn_always", "manual_seed", "seed", "set_rng_state",
        "export", "onnx", "cuda", "backends", "distributed", "multiprocessing",
    }
)
_TORCH_C_ALLOW = frozenset({"_set_grad_enabled", "_get_cpu_capability"})
_BUILTINS_ALLOW = frozenset(
    {"getattr", "len", "min", "max", "abs", "int", "float", "bool", "slice", "range", "tuple",
     "list", "dict", "round", "sum", "all", "any", "pow", "divmod", "isinstance"}
)
_OPS_NAMESPACES = frozenset({"aten", "prims", "graphpatch_cache"})
_METHOD_DENY = frozenset({"storage", "untyped_storage", "register_hook", "register_post_accumulate_grad_hook", "set_", "share_memory_"})


def register_target(fn: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
    """Allow graphs to call ``fn`` (also usable as a decorator).

    Register your own functions before loading artifacts that call them; a function that is
    not registered is refused at load time.
    """
    key = name or f"{fn.__module__}.{fn.__qualname__}"
    _REGISTERED[key] = fn
    return fn


def qualified_name(fn: Any) -> str:
    """The name under which ``fn`` is stored. Checked to resolve back to ``fn`` itself.

    :raises DisallowedTargetError: when ``fn`` would not be accepted at load time.
    """
    for key, registered in _REGISTERED.items():
        if registered is fn:
            return key
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = f"torch.ops.{fn._qualified_op_name.replace('::', '.')}" if isinstance(
            fn, torch._ops.OpOverloadPacket) else f"torch.ops.{fn.name().replace('::', '.')}"
        if isinstance(fn, torch._ops.OpOverload) and fn._overloadname == "default":
            name += ".default"
    elif fn in vars(builtins).values() and getattr(fn, "__name__", None) in vars(builtins):
        name = f"builtins.{fn.__name__}"
    else:
        module = getattr(fn, "__module__", None)
        qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            home = _find_torch_home(fn)
            if home is not None:
                module, qual = home, fn.__name__
        if module is None:
            # torch builtins defined in C have no module: find them in the torch namespaces.
            module = _find_torch_home(fn)
        if module is None or qual is None:
            raise DisallowedTargetError(f"cannot name call target {fn!r}", target=repr(fn))
        if module == "torch._C._VariableFunctions" or module == "torch._C._VariableFunctionsClass":
            module = "torch"
        name = f"{module}.{qual}"
    if resolve_target(name, _check_only=True) is not fn:
        raise DisallowedTargetError(
            f"call target {name} does not resolve back to the same function", target=name
        )
    return name


def _find_torch_home(fn: Any) -> str | None:
    name = getattr(fn, "__name__", None)
    for module_name in ("torch", "torch.nn.functional", "torch._C._nn", "torch.linalg", "torch.fft", "torch.special"):
        module = importlib.import_module(module_name)
        if name and getattr(module, name, None) is fn:
            return module_name
    return None


def _import_longest(name: str) -> tuple[Any, list[str]]:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            return importlib.import_module(".".join(parts[:cut])), parts[cut:]
        except ImportError:
            continue
    raise ImportError(name)


def resolve_target(name: str, *, node_path: str = "", _check_only: bool = False) -> Any:
    """The callable stored as ``name``.

    :raises DisallowedTargetError: when ``name`` is outside the allowlist; nothing is called.
    """

    def refuse(why: str) -> DisallowedTargetError:
        where = f" at node {node_path}" if node_path else ""
        return DisallowedTargetError(
            f"refusing call target {name!r}{where}: {why}",
            node_path=node_path,
            target=name,
            hint="only torch operators, operator, math, a few builtins and functions registered "
            "with graphpatch_cache.register_target may be called; do not load artifacts you do not trust",
        )

    if not isinstance(name, str) or not name:
        raise refuse("not a name")
    if name in _REGISTERED:
        return _REGISTERED[name]
    head, _, rest = name.partition(".")
    if head == "builtins":
        if rest not in _BUILTINS_ALLOW:
            raise refuse("builtin not allowed")
        return getattr(builtins, rest)
    if head in ("operator", "_operator"):
        fn = getattr(operator, rest, None)
        if fn is None or rest.startswith("_") and not rest.startswith("__"):
            raise refuse("unknown operator function")
        return fn
    if head == "math":
        fn = getattr(math, rest, None)
        if not callable(fn):
            raise refuse("unknown math function")
        return fn
    if head != "torch":
        raise refuse("module outside the allowlist")
    if rest.startswith("ops."):
        parts = rest.split(".")
        if len(parts) not in (3, 4) or parts[1] not in _OPS_NAMESPACES:
            raise refuse("operator namespace not allowed")
        try:
            obj: Any = getattr(getattr(torch.ops, parts[1]), parts[2])
            if len(parts) == 4:
                obj = getattr(obj, parts[3])
        except (AttributeError, RuntimeError) as exc:
            raise refuse("no such operator") from exc
        return obj
    module_name, _, attr = name.rpartition(".")
    if module_name == "torch._C":
        if attr not in _TORCH_C_ALLOW:
            raise refuse("torch._C function not allowed")
        return getattr(torch._C, attr)
    if module_name not in _TORCH_FUNCTION_MODULES or attr.startswith("_") and module_name == "torch" and attr not in ("_assert",):
        raise refuse("torch namespace not allowed")
    if module_name == "torch" and attr in _TORCH_DENY:
        raise refuse("torch function with side effects beyond the graph")
    module = importlib.import_module(module_name) if module_name != "torch._C._VariableFunctions" else torch._C._VariableFunctions
    fn = getattr(module, attr, None)
    if fn is None or isinstance(fn, types.ModuleType) or isinstance(fn, type) and not issubclass(fn, torch.dtype.__class__):
        if fn is None or isinstance(fn, types.ModuleType):
            raise refuse("not a function")
    if not callable(fn):
        raise refuse("not callable")
    return fn


def check_method(name: str, *, node_path: str = "") -> str:
    """Accept a ``call_method`` name only if it is a public method of ``torch.Tensor``."""
    ok = isinstance(name, str) and name not in _METHOD_DENY and hasattr(torch.Tensor, name) and (
        not name.startswith("_") or name in ("__getitem__", "__and__", "__or__", "__xor__", "__invert__",
                                             "__rshift__", "__lshift__", "__matmul__", "__contains__")
    )
    if not ok:
        raise DisallowedTargetError(
            f"refusing method call {name!r} at node {node_path}: not a public torch.Tensor method",
            node_path=node_path,
            target=str(name),
        )
    return name


__all__ = ["check_method", "qualified_name", "register_target", "resolve_target"]
