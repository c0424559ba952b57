"""Functions that extracted graphs call besides torch's own operators.

They are registered in the call-target allowlist (:mod:`graphpatch_cache.allowlist`) under
stable names, so artifacts can refer to them as data.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from . import _compat, kv_cache  # noqa: F401  kv_cache registers CacheState, which tree_build specs name
from .allowlist import register_target


@register_target
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


@register_target
def set_grad_enabled(mode: bool) -> bool:
    """Switch grad mode; returns the previous mode (for :func:`restore_grad_enabled`)."""
    previous = torch.is_grad_enabled()
    torch._C._set_grad_enabled(mode)
    return previous


@register_target
def restore_grad_enabled(previous: bool) -> None:
    """Restore the grad mode that :func:`set_grad_enabled` replaced."""
    torch._C._set_grad_enabled(previous)


@register_target
def linear_8bit(ref: "ModuleRef", x: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
    """A bitsandbytes 8-bit linear. With its own weight (the int8 parameter, unpatched) it
    runs the module itself, exactly; with a patched (dequantized, float) weight it computes
    ``F.linear`` with that weight."""
    module = ref.module
    if weight is module.weight and bias is module.bias:
        return module(x)
    out = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return out


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


@register_target
def run_opaque(
    ref: ModuleRef,
    input_spec: str,
    constants: List[Any],
    is_tensor: List[bool],
    tensors: List[Any],
    params: Dict[str, Any],
) -> Any:
    """Call an opaque module with (possibly patched) inputs and parameters.

    ``constants`` holds the non-tensor leaves of the ``(args, kwargs)`` the graph was extracted
    with, ``is_tensor`` says which leaves are tensors instead; ``tensors`` are those, in order. Parameters and
    buffers that differ from the module's own (because a patch replaced them) are substituted
    for this call only, through :func:`torch.func.functional_call`. While it runs, the
    module's calls of its children go to their extracted graphs (see ``ModuleRef.routes``).
    """
    module = ref.module
    it = iter(tensors)
    leaves = [next(it) if t else c for c, t in zip(constants, is_tensor)]
    args, kwargs = _compat.tree_unflatten(leaves, spec_of(input_spec))
    changed: Dict[str, Any] = {}
    if params:  # only opaque graphs with exposed tensors pay for the comparison
        own = dict(module.named_parameters(remove_duplicate=False))
        own.update(module.named_buffers(remove_duplicate=False))
        changed = {name: value for name, value in params.items() if own.get(name) is not value}
    with _routed(ref):
        if not changed:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, changed, tuple(args), dict(kwargs), strict=False)


__all__ = ["ModuleRef", "linear_8bit", "live_attr", "restore_grad_enabled", "run_opaque", "set_grad_enabled", "tree_build"]
