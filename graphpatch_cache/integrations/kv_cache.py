"""Key/value caches (transformers' ``DynamicCache``) as plain tensors in and out of graphs.

A cache object is mutated in place by the model (each attention layer concatenates its new
keys and values onto the cache's tensors), which a stored graph cannot express. So at the
boundary of the whole model a cache becomes a :class:`CacheState`: our own pytree node
holding each layer's ``(keys, values)``. The root graph takes the cached tensors as inputs and
returns the updated ones as outputs; :class:`~graphpatch_cache.PatchableGraph` writes them
back into the caller's cache object (or builds a new cache when the call created one), so a
call through the graph leaves the cache exactly as a call of the model does.

Inside the graph (below the root) the cache stays the model's own object: dynamo follows its
attribute reads and writes, and the splitter threads the tensors as hidden inputs and extra
outputs of the module calls that touch them.

Only ``DynamicCache`` made of plain ``DynamicLayer`` s is supported: it grows by
concatenation, so one shape-generic graph serves every step. Other caches raise
:class:`~graphpatch_cache.errors.UnsupportedCacheError` naming the class and the workaround.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import _compat
from ..errors import UnsupportedCacheError


class CacheState:
    """The tensors of a ``DynamicCache``: ``layers[i] = (keys, values)`` (None while a layer
    is still empty). A pytree node, serialized as ``graphpatch_cache.CacheState``."""

    def __init__(self, layers: List[Tuple[Any, Any]]) -> None:
        self.layers = [tuple(kv) for kv in layers]

    def __getitem__(self, name: str) -> Any:
        """``state["layer3_keys"]``: one tensor by its pytree key (graphs read a child call's
        returned cache this way)."""
        layer, _, which = str(name).partition("_")
        if not layer.startswith("layer") or which not in ("keys", "values"):
            raise KeyError(name)
        return self.layers[int(layer[5:])][0 if which == "keys" else 1]

    def __repr__(self) -> str:
        shapes = [tuple(k.shape) if isinstance(k, torch.Tensor) else None for k, _ in self.layers]
        return f"CacheState(layers={len(self.layers)}, key shapes={shapes})"


def _flatten(state: CacheState) -> Tuple[List[Any], Any]:
    leaves: List[Any] = []
    for k, v in state.layers:
        leaves.extend((k, v))
    return leaves, len(state.layers)


def _unflatten(leaves: Any, context: Any) -> CacheState:
    leaves = list(leaves)
    return CacheState([(leaves[2 * i], leaves[2 * i + 1]) for i in range(int(context))])


def _flatten_with_keys(state: CacheState) -> Tuple[List[Tuple[Any, Any]], Any]:
    leaves, context = _flatten(state)
    keys: List[Any] = []
    for i in range(len(state.layers)):
        keys.extend((_compat.MappingKey(f"layer{i}_keys"), _compat.MappingKey(f"layer{i}_values")))
    return list(zip(keys, leaves)), context


_compat.register_tree_node(
    CacheState,
    _flatten,
    _unflatten,
    serialized_type_name="graphpatch_cache.CacheState",
    flatten_with_keys_fn=_flatten_with_keys,
)


# -- recognising caches --------------------------------------------------------------------------
def _cache_module() -> Any:
    """``transformers.cache_utils`` if it was imported (no model uses a cache without it)."""
    return sys.modules.get("transformers.cache_utils")


def cache_class() -> Any:
    """transformers' ``Cache`` base class, or None when transformers is not imported."""
    module = _cache_module()
    return None if module is None else module.Cache


def is_cache(value: Any) -> bool:
    module = _cache_module()
    return module is not None and isinstance(value, module.Cache)


def _check(cache: Any) -> None:
    module = _cache_module()
    kind = type(cache).__name__
    workaround = ("call with use_cache=False (pg.generate(..., use_cache=False) runs the whole sequence "
                  "each step and gives the same tokens), or pass a DynamicCache")
    if type(cache) is not module.DynamicCache:
        raise UnsupportedCacheError(
            f"{kind} cannot go through an extracted graph: only DynamicCache (grown by concatenation) is "
            f"supported", cache_class=kind, hint=workaround)
    if getattr(cache, "offloading", False):
        raise UnsupportedCacheError(
            "a DynamicCache with offloading=True cannot go through an extracted graph (it moves tensors "
            "between devices on side streams)", cache_class=kind, hint=workaround)
    for i, layer in enumerate(cache.layers):
        if type(layer) is not module.DynamicLayer:
            raise UnsupportedCacheError(
                f"layer {i} of this DynamicCache is a {type(layer).__name__}: models with sliding-window, "
                f"linear-attention or other special cache layers (Mistral/Gemma-style sliding windows, hybrid "
                f"models) are not supported through the graph yet, only plain DynamicLayer",
                cache_class=type(layer).__name__, hint=workaround)


def to_state(cache: Any) -> CacheState:
    """The tensors of ``cache`` (checked to be a supported cache)."""
    _check(cache)
    return CacheState([
        (layer.keys, layer.values) if getattr(layer, "is_initialized", False) else (None, None)
        for layer in cache.layers
    ])


def _is_state(value: Any) -> bool:
    return isinstance(value, CacheState)


def caches_in(value: Any) -> List[Any]:
    """The cache objects anywhere inside ``value`` (a pytree: canonical inputs, an output),
    in pytree order."""
    cls = cache_class()
    if cls is None:
        return []
    return [x for x in _compat.tree_leaves(value) if isinstance(x, cls)]


def cache_argument(forward: Any) -> Optional[str]:
    """The name under which ``forward`` takes a key/value cache (``cache`` since
    transformers 5, ``past_key_values`` before), or None."""
    params = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def as_states(value: Any) -> Any:
    """``value`` (canonical inputs, a module output) with every cache object in it replaced by
    its :class:`CacheState` (containers are rebuilt; nothing is changed in place)."""
    if not caches_in(value):
        return value
    leaves, spec = _compat.tree_flatten(value)
    return _compat.tree_unflatten([to_state(x) if is_cache(x) else x for x in leaves], spec)


def write_state(cache: Any, state: CacheState) -> Any:
    """Put ``state``'s tensors into ``cache`` (a DynamicCache), as the model's own update would."""
    module = _cache_module()
    while len(cache.layers) < len(state.layers):
        cache.layers.append(module.DynamicLayer())
    for layer, (k, v) in zip(cache.layers, state.layers):
        if k is None:
            continue
        layer.keys, layer.values = k, v
        layer.device = k.device
        layer.is_initialized = True
    return cache


def new_cache(state: CacheState) -> Any:
    """A new DynamicCache holding ``state``'s tensors."""
    module = _cache_module()
    if module is None:  # pragma: no cover - a CacheState only comes from a transformers model
        raise UnsupportedCacheError("transformers is not imported; cannot build a DynamicCache")
    cache = module.DynamicCache()
    return write_state(cache, state)


def empty_cache(dtypes: List[Optional[Tuple[torch.dtype, torch.dtype]]], device: Any) -> Any:
    """A DynamicCache whose layers are initialized and empty, as the model's first update
    leaves them before concatenating (``dtypes[i]``: layer i's key and value dtypes).

    Why: dynamo (torch 2.13) folds ``torch.tensor([], device="meta")``, which
    ``DynamicLayer.lazy_initialization`` calls, into a real meta tensor that fake tensors then
    refuse; ``torch.empty(0)`` traces fine. Extraction of an accelerate-hooked model (traced
    on the meta device) hands the model this cache where the model would create its own.
    """
    module = _cache_module()
    cache = module.DynamicCache()
    for kv in dtypes:
        layer = module.DynamicLayer()
        if kv is not None:
            layer.device = device
            layer.keys = torch.empty(0, dtype=kv[0], device=device)
            layer.values = torch.empty(0, dtype=kv[1], device=device)
            layer.is_initialized = True
        cache.layers.append(layer)
    return cache


def restore_caches(output: Any, given: List[Any]) -> Any:
    """Replace each :class:`CacheState` in a graph's ``output`` with a cache object: the
    caller's (``given``, in order; updated in place, as the model updates it) while there are
    any, else a new DynamicCache."""
    leaves, spec = _compat.tree_flatten(output, is_leaf=_is_state)
    if not any(_is_state(x) for x in leaves):
        return output
    callers = list(given)
    out = []
    for leaf in leaves:
        if _is_state(leaf):
            leaf = write_state(callers.pop(0), leaf) if callers else new_cache(leaf)
        out.append(leaf)
    return _compat.tree_unflatten(out, spec)


def copy_caches(inputs: Tuple[Tuple[Any, ...], Dict[str, Any]],
                convert: Optional[Any] = None) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``inputs`` with each cache replaced by a fresh DynamicCache holding the same tensors
    (``convert(t)`` of them, if given), so a call that grows it leaves the original alone."""
    if _cache_module() is None:
        return inputs

    def copy(cache: Any) -> Any:
        state = to_state(cache)
        if convert is not None:
            state = CacheState([(None if k is None else convert(k), None if v is None else convert(v))
                                for k, v in state.layers])
        return new_cache(state)

    leaves, spec = _compat.tree_flatten(inputs)
    copied: Tuple[Tuple[Any, ...], Dict[str, Any]] = _compat.tree_unflatten([copy(x) if is_cache(x) else x for x in leaves],
                                                                            spec)
    return copied


__all__ = [
    "CacheState",
    "as_states",
    "copy_caches",
    "cache_argument",
    "caches_in",
    "is_cache",
    "new_cache",
    "restore_caches",
    "to_state",
    "write_state",
]
