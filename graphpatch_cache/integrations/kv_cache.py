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
concatenation, so one shape-generic graph serves every step. An encoder-decoder model's
``EncoderDecoderCache`` (a self-attention and a cross-attention ``DynamicCache``) is one
:class:`CacheState` with a ``cross`` part. Other caches raise
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
    is still empty). A pytree node, serialized as ``graphpatch_cache.CacheState``.

    For an ``EncoderDecoderCache``, ``layers`` are the self-attention cache's and ``cross``
    the cross-attention cache's (None for a plain ``DynamicCache``)."""

    def __init__(self, layers: List[Tuple[Any, Any]], cross: Optional[List[Tuple[Any, Any]]] = None) -> None:
        self.layers = [tuple(kv) for kv in layers]
        self.cross = None if cross is None else [tuple(kv) for kv in cross]

    def __getitem__(self, name: str) -> Any:
        """``state["layer3_keys"]`` (``state["cross_layer3_keys"]``): one tensor by its pytree
        key (graphs read a child call's returned cache this way)."""
        name = str(name)
        layers = self.layers
        if name.startswith("cross_") and self.cross is not None:
            layers, name = self.cross, name[6:]
        layer, _, which = name.partition("_")
        if not layer.startswith("layer") or which not in ("keys", "values"):
            raise KeyError(name)
        return layers[int(layer[5:])][0 if which == "keys" else 1]

    def __repr__(self) -> str:
        shapes = [tuple(k.shape) if isinstance(k, torch.Tensor) else None for k, _ in self.layers]
        cross = "" if self.cross is None else f", cross layers={len(self.cross)}"
        return f"CacheState(layers={len(self.layers)}, key shapes={shapes}{cross})"


def _flatten(state: CacheState) -> Tuple[List[Any], Any]:
    leaves: List[Any] = []
    for k, v in state.layers + (state.cross or []):
        leaves.extend((k, v))
    # context: the number of layers; [self, cross] layer counts for an encoder-decoder cache
    return leaves, len(state.layers) if state.cross is None else [len(state.layers), len(state.cross)]


def _unflatten(leaves: Any, context: Any) -> CacheState:
    leaves = list(leaves)
    pairs = [(leaves[2 * i], leaves[2 * i + 1]) for i in range(len(leaves) // 2)]
    if isinstance(context, (list, tuple)):
        n = int(context[0])
        return CacheState(pairs[:n], cross=pairs[n:n + int(context[1])])
    return CacheState(pairs[:int(context)])


def _flatten_with_keys(state: CacheState) -> Tuple[List[Tuple[Any, Any]], Any]:
    leaves, context = _flatten(state)
    keys: List[Any] = []
    for prefix, layers in (("", state.layers), ("cross_", state.cross or [])):
        for i in range(len(layers)):
            keys.extend((_compat.MappingKey(f"{prefix}layer{i}_keys"), _compat.MappingKey(f"{prefix}layer{i}_values")))
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
    if type(cache) is module.EncoderDecoderCache:
        _check_encoder_decoder(cache)
        return
    kind = type(cache).__name__
    workaround = ("call with use_cache=False (pg.generate(..., use_cache=False) runs the whole sequence "
                  "each step and gives the same tokens), or pass a DynamicCache")
    if type(cache) is not module.DynamicCache:
        raise UnsupportedCacheError(
            f"{kind} cannot go through an extracted graph: only DynamicCache (grown by concatenation) and "
            f"EncoderDecoderCache of two DynamicCaches are supported", cache_class=kind, hint=workaround)
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


def _check_encoder_decoder(cache: Any) -> None:
    """Both parts plain DynamicCaches, and ``is_updated`` (which the model reads to decide
    whether to compute the cross-attention keys and values or reuse them, a Python fact that
    a graph bakes in) saying exactly which cross-attention layers hold keys: the graph
    passes only tensors, and :func:`write_state` sets ``is_updated`` back from them."""
    _check(cache.self_attention_cache)
    _check(cache.cross_attention_cache)
    for i, layer in enumerate(cache.cross_attention_cache.layers):
        if bool(cache.is_updated.get(i)) != _filled(layer):
            raise UnsupportedCacheError(
                f"this EncoderDecoderCache's is_updated[{i}] is {cache.is_updated.get(i)!r}, but its "
                f"cross-attention layer {i} is {'filled' if _filled(layer) else 'empty'}: a graph passes the "
                f"cache as its tensors, so is_updated must follow them", cache_class="EncoderDecoderCache",
                hint="pass an EncoderDecoderCache as the model returned it (or a new, empty one)")


def _filled(layer: Any) -> bool:
    return bool(getattr(layer, "is_initialized", False)) and layer.keys.numel() > 0


def _pairs(layers: Any) -> List[Tuple[Any, Any]]:
    return [(layer.keys, layer.values) if getattr(layer, "is_initialized", False) else (None, None)
            for layer in layers]


def to_state(cache: Any) -> CacheState:
    """The tensors of ``cache`` (checked to be a supported cache)."""
    _check(cache)
    if type(cache) is _cache_module().EncoderDecoderCache:
        return CacheState(_pairs(cache.self_attention_cache.layers), cross=_pairs(cache.cross_attention_cache.layers))
    return CacheState(_pairs(cache.layers))


def cache_layers(cache: Any) -> List[Any]:
    """The layer objects of a supported cache in :class:`CacheState` order (an
    encoder-decoder cache's self-attention layers, then its cross-attention layers)."""
    if hasattr(cache, "cross_attention_cache"):
        return list(cache.self_attention_cache.layers) + list(cache.cross_attention_cache.layers)
    return list(cache.layers)


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
    """Put ``state``'s tensors into ``cache`` (a DynamicCache, or an EncoderDecoderCache for a
    state with a cross part), as the model's own update would."""
    if state.cross is not None:
        _write_layers(cache.self_attention_cache, state.layers)
        _write_layers(cache.cross_attention_cache, state.cross)
        # the model marks a cross-attention layer updated once it computed its keys
        for i, layer in enumerate(cache.cross_attention_cache.layers):
            cache.is_updated[i] = _filled(layer)
        return cache
    return _write_layers(cache, state.layers)


def _write_layers(cache: Any, layers: List[Tuple[Any, Any]]) -> Any:
    module = _cache_module()
    while len(cache.layers) < len(layers):
        cache.layers.append(module.DynamicLayer())
    for layer, (k, v) in zip(cache.layers, layers):
        if k is None:
            continue
        layer.keys, layer.values = k, v
        layer.device = k.device
        layer.is_initialized = True
    return cache


def new_cache(state: CacheState) -> Any:
    """A new DynamicCache (EncoderDecoderCache for a state with a cross part) holding
    ``state``'s tensors."""
    module = _cache_module()
    if module is None:  # pragma: no cover - a CacheState only comes from a transformers model
        raise UnsupportedCacheError("transformers is not imported; cannot build a DynamicCache")
    if state.cross is not None:
        return write_state(module.EncoderDecoderCache(module.DynamicCache(), module.DynamicCache()), state)
    return write_state(module.DynamicCache(), state)


#: per layer, its key and value dtypes (None: a layer left empty); a pair of such lists (self-
#: and cross-attention layers) for an encoder-decoder cache
LayerDtypes = Any


def layer_dtypes(cache: Any) -> LayerDtypes:
    """What :func:`empty_cache` needs to make a cache like ``cache``."""
    def each(layers: Any) -> List[Optional[Tuple[torch.dtype, torch.dtype]]]:
        return [(layer.keys.dtype, layer.values.dtype) if getattr(layer, "is_initialized", False) else None
                for layer in layers]

    if hasattr(cache, "cross_attention_cache"):
        return (each(cache.self_attention_cache.layers), each(cache.cross_attention_cache.layers))
    return each(cache.layers)


def empty_cache(dtypes: LayerDtypes, device: Any) -> Any:
    """A DynamicCache whose layers are initialized and empty, as the model's first update
    leaves them before concatenating (``dtypes[i]``: layer i's key and value dtypes); an
    EncoderDecoderCache of two such caches for a pair of lists (see :func:`layer_dtypes`).

    Why: dynamo (torch 2.13) folds ``torch.tensor([], device="meta")``, which
    ``DynamicLayer.lazy_initialization`` calls, into a real meta tensor that fake tensors then
    refuse; ``torch.empty(0)`` traces fine. Extraction of an accelerate-hooked model (traced
    on the meta device) hands the model this cache where the model would create its own.
    """
    module = _cache_module()
    if isinstance(dtypes, tuple):  # (empty cross-attention layers: is_updated is False)
        return module.EncoderDecoderCache(empty_cache(dtypes[0], device), empty_cache(dtypes[1], device))
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
            def each(pairs: List[Tuple[Any, Any]]) -> List[Tuple[Any, Any]]:
                return [(None if k is None else convert(k), None if v is None else convert(v)) for k, v in pairs]

            state = CacheState(each(state.layers), cross=None if state.cross is None else each(state.cross))
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
    "cache_layers",
    "caches_in",
    "is_cache",
    "layer_dtypes",
    "new_cache",
    "restore_caches",
    "to_state",
    "write_state",
]
