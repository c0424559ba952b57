"""Version differences and the few private torch entry points we rely on, in one place.

Each helper says which torch version needs it and why. Everything here is feature-checked
at import time so an incompatible torch fails with a clear message, not deep in a trace.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, ContextManager, Iterator, List, Optional

import torch
import torch.fx
import torch.utils._pytree as pytree

# torch >= 2.3: fx's public decorator that keeps an impure function out of dead-code
# elimination. Our extraction markers carry no data dependency the graph would keep alive.
if not hasattr(torch.fx.node, "has_side_effect"):  # pragma: no cover - old torch
    raise ImportError("graphpatch_cache needs torch.fx.node.has_side_effect (torch >= 2.3)")
has_side_effect = torch.fx.node.has_side_effect

# torch >= 2.3: pytree spec (de)serialization. Only classes registered with a
# serialized_type_name (tuples, lists, dicts, transformers' ModelOutput, ...) round-trip.
treespec_dumps = pytree.treespec_dumps

#: spec node types a stored spec may name: plain containers, torch.Size, our key/value cache
#: state, and transformers' ModelOutput classes (checked by class, below)
_SPEC_TYPES = frozenset({"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
                         "torch.Size", "graphpatch_cache.CacheState"})
_MAX_SPEC_DEPTH = 64


class UnsafeSpecError(ValueError):
    """A serialized pytree spec names a type or context a loader must not construct."""


def _is_model_output(cls: Any) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == "transformers.utils.generic.ModelOutput" for c in cls.__mro__)


def _check_spec_node(node: Any, depth: int, strict: bool) -> None:
    if depth > _MAX_SPEC_DEPTH:
        raise UnsafeSpecError("spec nested too deeply")
    if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
        raise UnsafeSpecError("malformed spec node")
    typ, context, children = node["type"], node["context"], node["children_spec"]
    if not isinstance(children, list):
        raise UnsafeSpecError("malformed spec children")
    if typ is None:
        if context is not None or children:
            raise UnsafeSpecError("malformed spec leaf")
        return
    registered = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(typ) if isinstance(typ, str) else None
    if registered is None and not strict and isinstance(typ, str) and typ.startswith("transformers.") and all(
            part.isidentifier() and not part.startswith("__") for part in typ.split(".")):
        pass  # a ModelOutput class of a transformers module not imported here; loading refuses it
    elif registered is None or not (typ in _SPEC_TYPES or _is_model_output(registered)):
        raise UnsafeSpecError(f"spec names type {typ!r}, which a stored spec may not construct")
    if not isinstance(context, str) or len(context) > 1 << 20:
        raise UnsafeSpecError("malformed spec context")
    # torch's loader decodes contexts with an object hook that imports the module an
    # "__enum__" entry names: contexts here are null or a flat list of keys, nothing else.
    value = json.loads(context)
    if value is not None and not (isinstance(value, list) and all(
            isinstance(k, (str, int)) and not isinstance(k, bool) for k in value)):
        if not (typ == "graphpatch_cache.CacheState" and isinstance(value, int) and not isinstance(value, bool)):
            raise UnsafeSpecError(f"spec context of {typ} is not a list of keys")
    if typ == "graphpatch_cache.CacheState":
        _check_cache_state(value, len(children))
    for child in children:
        _check_spec_node(child, depth + 1, strict)


def _check_cache_state(context: Any, n_children: int) -> None:
    """A key/value cache state's context: its number of layers (two leaves each), or each
    layer's sliding window (0: two leaves, a window: four), or ``["cross", n, m]`` (an
    encoder-decoder cache: n + m layers of two leaves; see integrations/kv_cache.py)."""
    if isinstance(context, list) and context[:1] == ["cross"]:
        counts = context[1:]
        if len(counts) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts) \
                or 2 * sum(counts) != n_children:
            raise UnsafeSpecError("spec of a key/value cache state: its context does not match its leaves")
        return
    windows = [0] * context if isinstance(context, int) else context
    if not isinstance(windows, list) or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in windows) \
            or sum(4 if w else 2 for w in windows) != n_children:
        raise UnsafeSpecError("spec of a key/value cache state: its context does not match its leaves")


def check_spec(serialized: str, *, strict: bool = True) -> Any:
    """Refuse a serialized spec naming anything beyond plain containers and ModelOutput classes;
    returns its parsed JSON. ``strict=False`` also passes transformers classes not registered
    in this process (a check without the model; loading the spec still refuses them).

    :raises UnsafeSpecError: (a ValueError) for any other type, context or shape.
    """
    try:
        data = json.loads(serialized)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UnsafeSpecError(f"spec is not JSON: {exc}") from None
    if not (isinstance(data, list) and len(data) == 2 and data[0] == 1):
        raise UnsafeSpecError("spec is not a version-1 pytree spec")
    _check_spec_node(data[1], 0, strict)
    return data


def treespec_loads(serialized: str) -> Any:
    """``pytree.treespec_loads`` after refusing anything it would import or construct beyond
    plain containers and ModelOutput classes.

    Why: torch 2.13's loader imports the module named by an ``"__enum__"`` context and by a
    ``collections.defaultdict`` node's ``default_factory_module``; a spec is artifact data.

    :raises UnsafeSpecError: (a ValueError) for any other type, context or shape.
    """
    check_spec(serialized)
    try:
        return pytree.treespec_loads(serialized)
    except Exception as exc:  # malformed beyond what was checked above
        raise UnsafeSpecError(f"spec does not load: {exc!s:.200}") from None


tree_flatten = pytree.tree_flatten
tree_map = pytree.tree_map
tree_unflatten = pytree.tree_unflatten
tree_flatten_with_path = pytree.tree_flatten_with_path


def is_compiling() -> bool:
    """True while dynamo traces (torch >= 2.3 exposes torch.compiler.is_compiling)."""
    return torch.compiler.is_compiling()


#: torch >= 2.6: sizes traced with a [0, inf] range, not specializing 0 and 1 (dynamo_capture_config)
SIZE_OBLIVIOUS = hasattr(getattr(torch.fx.experimental, "_config", None), "backed_size_oblivious")


@contextlib.contextmanager
def dynamo_capture_config(size_oblivious: bool = False, ones_static: Any = ()) -> Iterator[None]:
    """Dynamo settings for extraction (torch 2.13).

    - specialize_float: since torch 2.6 dynamo lifts Python float attributes (LayerNorm eps,
      attention scaling, math.pi) as graph inputs; we bake them as constants instead, the way
      the module would compute them.
    - use_duck_shape (torch.fx.experimental._config, torch >= 2.1): off, see below.
    - backed_size_oblivious (``size_oblivious``, where :data:`SIZE_OBLIVIOUS`): sizes of 1 get
      a symbol too, and a branch on a size being 1 becomes a guard (:func:`shape_facts`);
      the sizes of 1 of the tensors ``ones_static`` stay specialized (``mark_static``).
    """
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    # use_duck_shape: dynamo gives equal example sizes one symbol ("duck sizing"), so a graph
    # traced at batch == seq silently assumes they stay equal. We want one symbol per size.
    extra = {"backed_size_oblivious": True} if size_oblivious and SIZE_OBLIVIOUS else {}
    for t in ones_static:
        torch._dynamo.mark_static(t, [d for d, n in enumerate(t.shape) if n == 1])
    with torch._dynamo.config.patch(specialize_float=True, specialize_int=True), fx_config.patch(  # type: ignore[attr-defined]  # config modules gain .patch at import
            use_duck_shape=False, **extra):
        yield


def shape_facts(example_inputs: Any) -> Optional[Any]:
    """What a trace's shape environment knows: ``(guards, replace, hints, ranges)``, each guard
    (sympy: where all hold, the graph computes what the model does) with its source line
    (torch's ``"<line>  # <file>:<n> in <function>"``, or None), the symbol replacements (a
    function), each symbol's example value and ``(lower, upper)`` range (None: unbounded).
    Private: torch 2.13's ``ShapeEnv`` (``guards``, ``deferred_runtime_asserts``, ``replace``,
    ``backed_var_to_val``, ``var_to_range``) has no public reader; None where one is missing."""
    import sympy

    env = getattr(detect_fake_mode(example_inputs), "shape_env", None)
    needed = ("guards", "replace", "backed_var_to_val", "var_to_range", "deferred_runtime_asserts")
    if env is None or not all(hasattr(env, n) for n in needed):
        return None
    guards = [(g.expr, getattr(g.sloc, "maybe_user_loc", None)) for g in env.guards] + [
        (a.expr, None) for v in env.deferred_runtime_asserts.values() for a in v]

    def end(value: Any) -> Optional[int]:
        return int(value) if isinstance(value, sympy.Integer) else None  # (torch's int_oo is not one)

    ranges = {s: (end(r.lower), end(r.upper)) for s, r in env.var_to_range.items()}
    return guards, env.replace, dict(env.backed_var_to_val), ranges


@contextlib.contextmanager
def compiling_answer(answer: bool) -> Iterator[None]:
    """Make ``torch.compiler.is_compiling()`` answer ``answer`` for the duration.

    Why True (:func:`pretend_compiling`): extraction records each module call's input and
    output structure in one eager call and traces the same call with dynamo. Libraries take
    other paths while compiling (transformers 5 materializes the attention mask that eager
    sdpa leaves as None), so the eager recording must see the same answer as the trace.
    Why False (:func:`not_compiling`): an opaque module runs eagerly at patch time, so its
    recording and its run on fake tensors inside a dynamo trace (where dynamo holds the flag
    True) must take the eager paths too. torch 2.6-2.13 keep the answer in the module global
    ``torch.compiler._is_compiling_flag``.
    """
    import torch.compiler as tc

    if not hasattr(tc, "_is_compiling_flag"):  # pragma: no cover - other torch versions
        raise RuntimeError("this torch version has no torch.compiler._is_compiling_flag; "
                           "graphpatch_cache needs torch 2.6-2.13 semantics here")
    previous = tc._is_compiling_flag
    tc._is_compiling_flag = answer
    try:
        yield
    finally:
        tc._is_compiling_flag = previous


def pretend_compiling() -> ContextManager[None]:
    return compiling_answer(True)


def not_compiling() -> ContextManager[None]:
    return compiling_answer(False)


def reset_dynamo() -> None:
    """Drop dynamo's caches so the next capture traces afresh (public since torch 2.2)."""
    torch.compiler.reset()


def fake_value(node: torch.fx.Node) -> Any:
    """The example (fake) value dynamo recorded for a node; None when absent."""
    return node.meta.get("example_value", node.meta.get("val"))


# -- extraction ---------------------------------------------------------------------------------
# Private torch names the extraction package relies on (it imports none itself).

tree_leaves = pytree.tree_leaves

#: the higher-order op dynamo writes for a custom ``torch.autograd.Function`` (torch >= 2.3:
#: ``autograd_function_apply(fwd_body, bwd_body, *operands, ...)``, both bodies fx
#: GraphModules on the traced module); None where torch has no such op
AUTOGRAD_FUNCTION_APPLY = getattr(getattr(torch.ops, "higher_order", None), "autograd_function_apply", None)

#: torch's usage logging, which dynamo records as a call although it has no effect on values
#: (torch 2.x); the splitter drops it
API_USAGE_LOG = torch._C._log_api_usage_once

#: torch's grouped matmul (torch >= 2.8; ``torch.nn.functional.grouped_mm``, torch >= 2.10,
#: traces to it), which transformers' default Mixture-of-Experts layers call for bfloat16
#: weights. Its kernels trust the group offsets they are given, so graphs call it through
#: :func:`graphpatch_cache.trust.functions.grouped_mm`, which bounds them first; None where absent.
GROUPED_MM = getattr(torch, "_grouped_mm", None)


def detect_fake_mode(tensors: Any = None) -> Any:
    """The fake tensor mode of ``tensors`` (None: the active one), else None.

    Why private: torch 2.13 offers fake-mode detection only as ``torch._guards.detect_fake_mode``;
    running an opaque module's forward on the trace's fake inputs needs that mode."""
    import torch._guards  # (``import torch`` loads it already; named here for the dependency)

    return torch._guards.detect_fake_mode(tensors)


@contextlib.contextmanager
def quiet_symbolic_shapes_log() -> Iterator[None]:
    """Silence the symbolic-shapes logger (``torch.fx.experimental.symbolic_shapes``, torch
    >= 2.4), which warns for each data question real-tensor propagation answers."""
    import logging

    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# -- runtime and trust ---------------------------------------------------------------------------
# Private torch entry points the runtime (bind, guards), the loader's checks (trust/) and the
# key/value cache integration use; each is a name here so that a torch upgrade is checked in
# one place.

#: ``torch._C._set_grad_enabled`` (torch 1.x-2.13): switch grad mode without building the
#: ``torch.set_grad_enabled`` context object; graph functions switch it per call and
#: :func:`graphpatch_cache.runtime.guards.preserved_global_state` restores it per call. It is
#: also what dynamo records for ``with torch.no_grad():`` / ``torch.enable_grad()`` (torch 2.x
#: traces grad-mode switches as calls of it): extraction's splitter rewrites those calls.
set_grad_enabled = torch._C._set_grad_enabled

#: pytree registration of our own containers (the key/value cache state); torch has no public
#: pytree registration API as of 2.13.
register_tree_node = pytree.register_pytree_node
MappingKey = pytree.MappingKey

#: module names of torch's C builtins as ``__module__`` reports them (torch 2.x): functions
#: defined in ``torch._C._nn`` are ``torch.nn.functional``'s builtins, and the functions of
#: ``torch._C._VariableFunctions(Class)`` are stored as ``torch.*`` names.
TORCH_NN_BUILTINS = "torch._C._nn"
TORCH_VARIABLE_FUNCTIONS = ("torch._C._VariableFunctions", "torch._C._VariableFunctionsClass")


def is_op_overload(fn: Any) -> bool:
    """``fn`` is one overload of a torch operator (``torch.ops.aten.add.Tensor``); the class
    lives in ``torch._ops`` (torch 2.x)."""
    return isinstance(fn, torch._ops.OpOverload)


def is_op_overload_packet(fn: Any) -> bool:
    """``fn`` is a torch operator with all its overloads (``torch.ops.aten.add``)."""
    return isinstance(fn, torch._ops.OpOverloadPacket)


def op_schemas(fn: Any) -> List[Any]:
    """The schemas of a torch operator (one per overload of a packet); ``_schema`` is private
    (torch 2.x)."""
    if is_op_overload(fn):
        return [fn._schema]
    return [getattr(fn, o)._schema for o in fn.overloads()]


def parse_schema(text: str) -> Any:
    """A torch operator schema from its text (``torch._C.parse_schema``, private in torch 2.x):
    the loader checks calls of a reviewed operator against it without the operator registered."""
    return torch._C.parse_schema(text)


def op_name(fn: Any) -> str:
    """The ``torch.ops...`` name of an operator or one overload of it (from the private
    ``_qualified_op_name``, ``_schema`` and ``_overloadname``, torch 2.x)."""
    if is_op_overload_packet(fn):
        return f"torch.ops.{fn._qualified_op_name.replace('::', '.')}"
    return f"torch.ops.{fn._schema.name.replace('::', '.')}.{fn._overloadname}"


def operator_schemas(qualified: str) -> List[Any]:
    """Torch's schemas of the operator ``qualified`` (``"aten::add"``); torch 2.13 exposes
    them only through ``torch._C._jit_get_schemas_for_operator``."""
    return list(torch._C._jit_get_schemas_for_operator(qualified))


def find_builtin(fn: Any) -> Optional[str]:
    """The operator name (``"aten::add"``) TorchScript knows a Python-visible builtin by, or
    None (``torch.jit._builtins._find_builtin``, torch 1.x-2.13; None where it is missing)."""
    try:
        from torch.jit._builtins import _find_builtin  # a private module: absent in some versions
    except ImportError:  # pragma: no cover - other torch versions
        return None
    found = _find_builtin(fn)  # type: ignore[no-untyped-call]
    return found if isinstance(found, str) else None


# torch 2.x: what ``GraphModule.recompile`` does once code is generated (the class's forward,
# ``_code``/``_lineno_map``/``_prologue_start``, and its ``__call__`` through the private
# ``torch.fx.graph_module._WrappedCall``), so a forward compiled for one graph can be given to
# an identical one without generating code again. Feature-checked: where torch differs (no
# ``_WrappedCall``, profiler metadata on, a codegen other than the plain one) the caller
# compiles normally.
def shares_graph_code(graph: torch.fx.Graph) -> bool:
    """Whether a graph's code may be shared: torch's plain codegen, no profiler metadata."""
    import torch.fx.experimental._config as fx_config  # (loaded with torch.fx: a dict look-up)

    return (type(getattr(graph, "_codegen", None)) is torch.fx.graph.CodeGen
            and hasattr(torch.fx.graph_module, "_WrappedCall")
            and not getattr(fx_config, "enrich_profiler_metadata", False)
            and not getattr(graph, "_co_fields", None))


def install_graph_code(gm: torch.fx.GraphModule, forward: Any, python_code: Any) -> None:
    """Give ``gm`` (its own class) ``forward``, generated from ``python_code`` for an
    identical graph, exactly as ``GraphModule.recompile`` (torch 2.13) installs its own."""
    gm._code = python_code.src
    gm._lineno_map = python_code._lineno_map
    gm._prologue_start = python_code._prologue_start
    cls = type(gm)
    cls.forward = forward
    cls_call = cls.__call__ if "__call__" in vars(cls) else None
    if "_wrapped_call" not in vars(cls):
        cls._wrapped_call = torch.fx.graph_module._WrappedCall(cls, cls_call)  # type: ignore[attr-defined]
    gm._recompile_submodules()

    def call_wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped_call(self, *args, **kwargs)

    cls.__call__ = call_wrapped  # type: ignore[method-assign]


def assign_graph_attr(value: Any, gm: torch.fx.GraphModule, target: str) -> None:
    """Put ``value`` at ``target`` of ``gm`` as ``GraphModule.__init__`` does with a dict root
    (torch 2.x ``torch.fx.graph_module._assign_attr``: plain tensors become buffers)."""
    torch.fx.graph_module._assign_attr(value, gm, target)


__all__ = [
    "assign_graph_attr", "install_graph_code", "shares_graph_code", "dynamo_capture_config", "fake_value",
    "has_side_effect", "SIZE_OBLIVIOUS", "shape_facts", "is_compiling", "compiling_answer", "not_compiling", "pretend_compiling", "reset_dynamo",
    "tree_flatten", "tree_map", "tree_flatten_with_path", "tree_unflatten", "treespec_dumps", "treespec_loads",
    "check_spec", "UnsafeSpecError", "API_USAGE_LOG", "AUTOGRAD_FUNCTION_APPLY", "MappingKey", "GROUPED_MM",
    "TORCH_NN_BUILTINS", "TORCH_VARIABLE_FUNCTIONS", "detect_fake_mode", "parse_schema", "find_builtin",
    "is_op_overload", "is_op_overload_packet", "op_name", "op_schemas", "operator_schemas",
    "quiet_symbolic_shapes_log", "register_tree_node", "set_grad_enabled", "tree_leaves",
]
