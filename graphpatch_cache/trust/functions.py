"""Functions that extracted graphs call besides torch's own operators.

They are registered in the call-target allowlist (:mod:`graphpatch_cache.trust.allowlist`) under
stable names, so artifacts can refer to them as data.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Tuple, cast

import torch

from .. import _compat
from ..errors import GraphPatchCacheError, ShapeError
from ..integrations import kv_cache  # noqa: F401  kv_cache registers CacheState, which tree_build specs name
from ..integrations.bitsandbytes import quiet_casts_if_loaded, run_8bit
from ..errors import UnsupportedGradientError
from .allowlist import register_target

#: the namespace the artifact format names these functions in (``cache_schema/SPEC.md``):
#: fixed by the format, whatever module defines them
NAMESPACE = "graphpatch_cache.functions"


def _graph_function(fn: Any) -> Any:
    return register_target(fn, f"{NAMESPACE}.{fn.__name__}")



@_graph_function
def tree_build(spec: str, leaves: List[Any]) -> Any:
    """Rebuild a structured value (a ``ModelOutput``, a namedtuple...) from its leaves.

    ``spec`` is a serialized pytree spec; only classes registered with pytree under a
    serialized name can appear in it, so nothing else is ever constructed.
    """
    return _compat.tree_unflatten(list(leaves), spec_of(spec))


_SPECS: Dict[str, Any] = {}


def spec_of(text: str) -> Any:
    """A serialized spec, loaded once (through :func:`_compat.treespec_loads`, which refuses
    anything beyond containers and ModelOutput classes)."""
    spec = _SPECS.get(text)
    if spec is None:
        spec = _SPECS[text] = _compat.treespec_loads(text)
    return spec


@_graph_function
def set_grad_enabled(mode: bool) -> bool:
    """Switch grad mode; returns the previous mode (for :func:`restore_grad_enabled`)."""
    previous = torch.is_grad_enabled()
    _compat.set_grad_enabled(mode)
    return previous


@_graph_function
def restore_grad_enabled(previous: bool) -> None:
    """Restore the grad mode that :func:`set_grad_enabled` replaced."""
    _compat.set_grad_enabled(previous)


class _ForwardOnly(torch.autograd.Function):
    """Identity forward (a copy: the model may write into a Function's output in place, which
    autograd refuses for a view made inside a Function); a backward pass through it raises."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, label: str) -> torch.Tensor:
        ctx.label = label
        return value.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        module, _, function = ctx.label.rpartition(".")
        raise UnsupportedGradientError(
            f"a backward pass reached the output of the custom autograd Function {function!r}"
            + (f" (called by {module})" if module else "") + ", whose forward the graph runs inline: its own "
            "backward is not part of the graph, so no gradient is computed",
            function=function,
            hint=f"for gradients, extract with ExtractionOptions(classes_to_skip_compiling=({module or 'TheModule'},)): "
            "that module then runs its own forward (and the Function's backward); values are the same either way",
        )


@_graph_function
def forward_only(label: str, value: Any) -> Any:
    """The output of a custom autograd Function whose forward ops the graph runs inline (see
    ``extraction.autograd_functions``): returned as it is where no gradient can reach it;
    otherwise a copy whose backward raises :class:`UnsupportedGradientError`, since the
    gradient of the inlined ops need not be the Function's own. ``label`` (``Function`` or
    ``Module.Function``: the class names of the Function and of the module calling it) is
    for the error message only."""
    if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
        return _ForwardOnly.apply(value, label)
    return value


@_graph_function
def linear_8bit(ref: "ModuleRef", x: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
    """A bitsandbytes 8-bit linear. With its own weight (the int8 parameter, unpatched) it
    runs the module itself, exactly; with a patched (dequantized, float) weight it computes
    ``F.linear`` with that weight."""
    module = ref.module
    if weight is module.weight and bias is module.bias:
        return run_8bit(module, x)  # (bitsandbytes' per-call cast notice shown once, not per layer)
    out = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return out


@_graph_function
def grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch's grouped matmul (what extraction stores a ``torch._grouped_mm`` call as) with its
    group offsets bounded first. torch's kernels trust ``offs``: offsets past the jagged
    dimension, decreasing ones, or more groups than ``mat_b`` has would make them read and
    write outside the operands. Offsets are clamped to ``[0, size]`` and made non-decreasing
    (``cummax``), which leaves valid ones (a MoE layer's cumulative token counts) as they are,
    without a device sync.

    :raises ShapeError: ``offs`` is not one offset per group of the operands.
    :raises GraphPatchCacheError: this torch has no grouped matmul.
    """
    if _compat.GROUPED_MM is None:
        raise GraphPatchCacheError("this torch has no grouped matmul (torch._grouped_mm)",
                                   hint="load graphs of Mixture-of-Experts models in bfloat16 with torch >= 2.8")
    if offs is not None:
        if mat_a.dim() == 3 and mat_b.dim() == 3:
            raise ShapeError("grouped_mm: two 3-D operands take no offsets")
        groups = mat_b.size(0) if mat_b.dim() == 3 else mat_a.size(0) if mat_a.dim() == 3 else offs.numel()
        size = mat_a.size(0) if mat_b.dim() == 3 else mat_b.size(1) if mat_a.dim() == 3 else mat_a.size(1)
        if offs.dim() != 1 or offs.numel() != groups:
            raise ShapeError(f"grouped_mm: offs must hold one offset per group ({groups}), got shape "
                             f"{tuple(offs.shape)}", hint="the graph does not fit its operands: extract it again")
        offs = torch.cummax(offs.clamp(0, size), dim=0).values
    return cast(torch.Tensor, _compat.GROUPED_MM(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype))


@_graph_function
def histc(input: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:
    """``torch.histc`` as extraction stores it: the same values on every device. Traced code may
    choose the input's dtype by device (transformers' MoE layers count tokens per expert with
    an integer histogram off CPU, a float one on CPU, where torch has no integer kernel), so a
    graph traced on CUDA or the meta device counts integers; here they are counted as floats
    on CPU and MPS, with the integer result torch would give."""
    if not input.is_floating_point() and input.device.type in ("cpu", "mps"):
        return torch.histc(input.float(), bins, min, max).to(input.dtype)
    return torch.histc(input, bins, min, max)


def live_attr(ref: "ModuleRef", path: str) -> Any:
    """A module attribute read at call time: accelerate's offload hooks replace parameters
    while the module runs, so graphs of hooked modules must not hold them from bind time.
    Not a target artifacts may name: binding inserts it, for attributes it has checked."""
    owner, _, name = path.rpartition(".")
    module = ref.module.get_submodule(owner) if owner else ref.module
    return getattr(module, name)


class ModuleRef:
    """Holds the live module an opaque graph calls, without registering it as a child, and
    the routes that send its own calls of its children to their extracted graphs."""

    __slots__ = ("module", "routes")

    def __init__(self, module: torch.nn.Module, routes: Optional[List[Tuple[torch.nn.Module, str, Any]]] = None) -> None:
        self.module = module
        self.routes = routes or []

    def __repr__(self) -> str:
        return f"ModuleRef({type(self.module).__name__})"


@contextlib.contextmanager
def _routed(ref: ModuleRef) -> Iterator[None]:
    saved = []
    try:
        for owner, name, router in ref.routes:
            saved.append((owner, name, owner._modules[name]))
            router.reset()
            owner._modules[name] = router
        yield
    finally:
        for owner, name, original in reversed(saved):
            owner._modules[name] = original


#: what every nn.Module has (its machinery, not the model's state), accelerate's and
#: transformers' bookkeeping: never exposed as an opaque module's attribute
_MODULE_INTERNALS = frozenset(dir(torch.nn.Module)) | frozenset(getattr(torch.nn.Module, "__annotations__", {})) | {
    "training", "forward", "_hf_hook", "_old_forward", "_is_hf_initialized", "__slotnames__"}
#: attributes transformers' PreTrainedModel declares or sets on every model (config, device,
#: generation settings, quantization flags): not the model's own state
_PRETRAINED_INTERNALS = frozenset({
    "config", "device", "dtype", "generation_config", "hf_device_map", "is_loaded_in_8bit", "name_or_path",
    "warnings_issued", "_hf_peft_config_loaded", "hf_quantizer", "is_8bit_serializable", "is_quantized",
    "quantization_method"})
_PLAIN_TYPES = (bool, int, float, complex, str, type(None), torch.dtype, torch.device)


def _plain_data(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN_TYPES):
        return True
    if type(value) in (tuple, list) and depth < 4 and len(value) <= 1024:
        return all(_plain_data(v, depth + 1) for v in value)
    return False


def _pretrained_names(module: torch.nn.Module) -> FrozenSet[str]:
    for cls in type(module).__mro__:
        if cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers."):
            return frozenset(dir(cls)) | _PRETRAINED_INTERNALS
    return frozenset()


def attribute_exposed(module: torch.nn.Module, name: Any) -> bool:
    """Whether an opaque graph exposes ``module``'s attribute ``name`` as a patchable node:
    a name that is no dunder, no Module or transformers machinery, no parameter, buffer or
    child, no property, method or other descriptor, holding plain data (numbers, strings,
    bools, None, dtypes, devices, and tuples/lists of them). Looked up statically
    (:func:`inspect.getattr_static`): deciding runs none of the module's code."""
    if not isinstance(name, str) or not name.isidentifier() or (name.startswith("__") and name.endswith("__")):
        return False
    if name in _MODULE_INTERNALS or name in module._parameters or name in module._buffers or name in module._modules:
        return False
    if name in _pretrained_names(module):
        return False
    for cls in type(module).__mro__:  # a descriptor on the class decides what reading runs
        if name in cls.__dict__:
            found = cls.__dict__[name]
            kind = type(found)
            if hasattr(kind, "__get__") and (hasattr(kind, "__set__") or name not in module.__dict__):
                return False
            break
    try:
        value = inspect.getattr_static(module, name)
    except AttributeError:
        return False
    return _plain_data(value)


def exposed_attributes(module: torch.nn.Module) -> List[str]:
    """The attribute names an opaque graph of ``module`` exposes (sorted; see
    :func:`attribute_exposed`)."""
    names = set(module.__dict__)
    for cls in type(module).__mro__:
        if cls is torch.nn.Module or cls is object:
            continue
        names.update(cls.__dict__)
    return sorted(n for n in names if attribute_exposed(module, n))


@_graph_function
def module_attribute(ref: ModuleRef, name: str) -> Any:
    """An opaque module's attribute ``name``, read at call time (so a patch on its node sees
    the live value; :func:`run_opaque` lets the module see the patched one)."""
    return getattr(ref.module, name)


@_graph_function
def run_opaque(
    ref: ModuleRef,
    input_spec: str,
    constants: List[Any],
    is_tensor: List[bool],
    tensors: List[Any],
    params: Dict[str, Any],
    attributes: Optional[Dict[str, Any]] = None,
) -> Any:
    """Call an opaque module with (possibly patched) inputs, parameters and attributes.

    ``constants`` holds the non-tensor leaves of the ``(args, kwargs)`` the graph was extracted
    with, ``is_tensor`` says which leaves are tensors instead; ``tensors`` are those, in order. Parameters and
    buffers that differ from the module's own (because a patch replaced them) are substituted
    for this call only, through :func:`torch.func.functional_call`. ``attributes`` are the
    module's plain-data attributes (see :func:`module_attribute`): one a patch replaced is
    the module's for this call only, and its own value is back afterwards. While it runs, the
    module's calls of its children go to their extracted graphs (see ``ModuleRef.routes``).
    """
    module = ref.module
    it = iter(tensors)
    leaves = [next(it) if t else c for c, t in zip(constants, is_tensor)]
    args, kwargs = _compat.tree_unflatten(leaves, spec_of(input_spec))
    changed: Dict[str, Any] = {}
    if params:  # only opaque graphs with exposed tensors pay for the comparison
        changed = {name: value for name, value in params.items() if _own_tensor(module, name) is not value}
    with _routed(ref), _attributes_set(module, attributes), quiet_casts_if_loaded():
        if not changed:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, changed, tuple(args), dict(kwargs), strict=False)


_NOT_SET = object()


def _own_tensor(module: torch.nn.Module, name: str) -> Any:
    """The parameter or buffer ``name`` (dotted) of ``module``, found through the registered
    tables (walking ``named_parameters`` per call cost more than the module's own work)."""
    owner = module
    path, _, leaf = name.rpartition(".")
    for part in path.split(".") if path else ():
        child = owner._modules.get(part)
        if child is None:
            return None
        owner = child
    found = owner._parameters.get(leaf)
    return found if found is not None else owner._buffers.get(leaf)


@contextlib.contextmanager
def _attributes_set(module: torch.nn.Module, attributes: Optional[Dict[str, Any]]) -> Iterator[None]:
    """Give ``module`` the patched attribute values for one call. Written to the instance
    ``__dict__`` directly (Module.__setattr__ would register a tensor or module value), and
    put back as they were: the instance's own value, or none (a class attribute shows again)."""
    saved = []
    try:
        for name, value in (attributes or {}).items():
            if value is getattr(module, name):
                continue
            saved.append((name, module.__dict__.get(name, _NOT_SET)))
            module.__dict__[name] = value
        yield
    finally:
        for name, old in reversed(saved):
            if old is _NOT_SET:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = old


__all__ = ["ModuleRef", "attribute_exposed", "exposed_attributes", "forward_only", "grouped_mm", "histc", "linear_8bit", "live_attr", "module_attribute",
           "restore_grad_enabled", "run_opaque", "set_grad_enabled", "tree_build"]
