"""Key/value caches (transformers' ``DynamicCache``) as plain tensors in and out of graphs.

The model mutates a cache object in place, which a stored graph cannot express. So at the
boundary of the whole model a cache becomes a :class:`CacheState`, our own pytree node of
each layer's tensors: the root graph takes them as inputs and returns the updated ones, and
:class:`~graphpatch_cache.PatchableGraph` writes them back into the caller's cache (or builds
a new one), so a call through the graph leaves the cache as a call of the model does. Inside
the graph the cache stays the model's own object (dynamo follows it; the splitter threads its
tensors through the module calls that touch it).

Supported: ``DynamicCache`` of ``DynamicLayer`` s (grown by concatenation: one shape-generic
graph serves every step) and ``DynamicSlidingWindowLayer`` s (two more leaves per layer, see
:mod:`.kv_sliding`), and ``EncoderDecoderCache`` (a :class:`CacheState` with a ``cross``
part). Other caches raise :class:`~graphpatch_cache.errors.UnsupportedCacheError`. A state's
pytree context (stored, checked by the loader in ``_compat``): the number of plain layers;
each layer's window (0: plain) when one slides; ``["cross", self layers, cross layers]``.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import _compat
from ..errors import UnsupportedCacheError
from .kv_sliding import LENGTH_ATTRIBUTE, length_tensor, skipped_window_mask, window_of


#: the names of a layer's leaves: a plain layer's first two, a sliding layer's all four
_FIELDS = ("keys", "values", "length", "full")


class CacheState:
    """The tensors of a ``DynamicCache``: ``layers[i] = (keys, values)`` (None while a layer
    is still empty), or ``(keys, values, length, full)`` for a sliding-window layer
    (``windows[i]`` its window, 0 for a plain layer; see :mod:`.kv_sliding`); for an
    ``EncoderDecoderCache``, ``layers`` are the self-attention cache's and ``cross`` the
    cross-attention cache's pairs (None for a plain cache). A pytree node, serialized as
    ``graphpatch_cache.CacheState`` (context: see the module's docstring)."""

    def __init__(self, layers: List[Tuple[Any, ...]], windows: Optional[List[int]] = None,
                 cross: Optional[List[Tuple[Any, Any]]] = None) -> None:
        self.layers = [tuple(kv) for kv in layers]
        self.windows = [int(w) for w in windows] if windows and any(windows) else None
        self.cross = None if cross is None else [tuple(kv) for kv in cross]

    def window(self, i: int) -> int:
        return self.windows[i] if self.windows is not None else 0

    def __getitem__(self, name: str) -> Any:
        """``state["layer3_keys"]`` (``state["cross_layer3_keys"]``): one leaf by its pytree
        key (graphs read a child call's returned cache this way)."""
        name, layers = str(name), self.layers
        if name.startswith("cross_") and self.cross is not None:
            layers, name = self.cross, name[6:]
        layer, _, which = name.partition("_")
        if not layer.startswith("layer") or which not in _FIELDS:
            raise KeyError(name)
        entry = layers[int(layer[5:])]
        if _FIELDS.index(which) >= len(entry):
            raise KeyError(name)
        return entry[_FIELDS.index(which)]

    def __repr__(self) -> str:
        shapes = [tuple(entry[0].shape) if isinstance(entry[0], torch.Tensor) else None for entry in self.layers]
        cross = "" if self.cross is None else f", cross layers={len(self.cross)}"
        return f"CacheState(layers={len(self.layers)}, key shapes={shapes}{cross})"


def _flatten(state: CacheState) -> Tuple[List[Any], Any]:
    leaves: List[Any] = []
    for entry in state.layers + (state.cross or []):
        leaves.extend(entry)
    if state.cross is not None:
        return leaves, ["cross", len(state.layers), len(state.cross)]
    return leaves, len(state.layers) if state.windows is None else list(state.windows)


def _unflatten(leaves: Any, context: Any) -> CacheState:
    leaves = list(leaves)
    if isinstance(context, (list, tuple)) and context and context[0] == "cross":
        pairs = [(leaves[2 * i], leaves[2 * i + 1]) for i in range(len(leaves) // 2)]
        n = int(context[1])
        return CacheState(pairs[:n], cross=pairs[n:n + int(context[2])])
    windows = [0] * int(context) if isinstance(context, int) else [int(w) for w in context]
    layers, at = [], 0
    for w in windows:
        n = 4 if w else 2
        layers.append(tuple(leaves[at:at + n]))
        at += n
    return CacheState(layers, windows)


def _flatten_with_keys(state: CacheState) -> Tuple[List[Tuple[Any, Any]], Any]:
    leaves, context = _flatten(state)
    keys: List[Any] = []
    for prefix, layers in (("", state.layers), ("cross_", state.cross or [])):
        for i, entry in enumerate(layers):
            keys.extend(_compat.MappingKey(f"{prefix}layer{i}_{field}") for field in _FIELDS[:len(entry)])
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
    if type(cache) is module.EncoderDecoderCache:
        _check_encoder_decoder(cache)
        return
    if type(cache) is not module.DynamicCache:
        raise UnsupportedCacheError(
            f"{kind} cannot go through an extracted graph: only DynamicCache (grown by concatenation) and "
            f"EncoderDecoderCache of two DynamicCaches are supported", cache_class=kind, hint=workaround)
    if getattr(cache, "offloading", False):
        raise UnsupportedCacheError(
            "a DynamicCache with offloading=True cannot go through an extracted graph (it moves tensors "
            "between devices on side streams)", cache_class=kind, hint=workaround)
    for i, layer in enumerate(cache.layers):
        if type(layer) is module.DynamicSlidingWindowLayer and getattr(layer, "record_past", False):
            raise UnsupportedCacheError(
                f"layer {i} of this DynamicCache records its past beyond the sliding window "
                f"(activate_past_recording, used by assisted decoding), which a graph does not follow",
                cache_class=type(layer).__name__, hint=workaround)
        if type(layer) not in (module.DynamicLayer, module.DynamicSlidingWindowLayer):
            raise UnsupportedCacheError(
                f"layer {i} of this DynamicCache is a {type(layer).__name__}: models with linear-attention, "
                f"indexed or other special cache layers are not supported through the graph yet, only "
                f"DynamicLayer and DynamicSlidingWindowLayer",
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


def _entries(layers: Any) -> List[Tuple[Any, ...]]:
    out: List[Tuple[Any, ...]] = []
    for layer in layers:
        window = window_of(layer)
        if not getattr(layer, "is_initialized", False):
            out.append((None,) * (4 if window else 2))
        elif window:
            length = layer.cumulative_length
            out.append((layer.keys, layer.values, length_tensor(layer.keys, length), length >= window))
        else:
            out.append((layer.keys, layer.values))
    return out


def to_state(cache: Any) -> CacheState:
    """The tensors of ``cache`` (checked to be a supported cache)."""
    _check(cache)
    if type(cache) is _cache_module().EncoderDecoderCache:
        own = cache.self_attention_cache.layers
        return CacheState(_entries(own), [window_of(layer) for layer in own],
                          cross=_entries(cache.cross_attention_cache.layers))
    return CacheState(_entries(cache.layers), [window_of(layer) for layer in cache.layers])


def cache_layers(cache: Any) -> List[Any]:
    """The layer objects of a supported cache in :class:`CacheState` order (an
    encoder-decoder cache's self-attention layers, then its cross-attention layers)."""
    if hasattr(cache, "cross_attention_cache"):
        return list(cache.self_attention_cache.layers) + list(cache.cross_attention_cache.layers)
    return list(cache.layers)


def window_lengths(value: Any) -> List[int]:
    """The ``cumulative_length`` of every sliding layer of the first cache in ``value`` (0 for
    a layer not yet filled; empty without a cache or a sliding layer)."""
    caches = caches_in(value)
    if not caches:
        return []
    layers = caches[0].self_attention_cache.layers if hasattr(caches[0], "cross_attention_cache") else caches[0].layers
    return [int(getattr(layer, "cumulative_length", 0)) for layer in layers if window_of(layer)]


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
    state with a cross part), as the model's own update would (a sliding layer's length too;
    missing layers are made of the state's kinds)."""
    if state.cross is not None:
        _write_layers(cache.self_attention_cache, state.layers, state.window)
        _write_layers(cache.cross_attention_cache, state.cross, lambda i: 0)
        # the model marks a cross-attention layer updated once it computed its keys
        for i, layer in enumerate(cache.cross_attention_cache.layers):
            cache.is_updated[i] = _filled(layer)
        return cache
    return _write_layers(cache, state.layers, state.window)


def _write_layers(cache: Any, layers: List[Tuple[Any, ...]], window: Any) -> Any:
    module = _cache_module()
    while len(cache.layers) < len(layers):
        w = window(len(cache.layers))
        cache.layers.append(module.DynamicSlidingWindowLayer(w) if w else module.DynamicLayer())
    for i, (layer, entry) in enumerate(zip(cache.layers, layers)):
        if entry[0] is None:
            continue
        layer.keys, layer.values = entry[0], entry[1]
        layer.device = entry[0].device
        layer.is_initialized = True
        if window(i):
            layer.cumulative_length = int(entry[2].shape[0])
            layer._sliding_window_tensor = layer._sliding_window_tensor.to(layer.device)
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


#: per layer, its key and value dtypes and sliding window (None: a layer left empty); a pair
#: of such lists (self- and cross-attention layers) for an encoder-decoder cache
LayerDtypes = Any


def empty_cache(dtypes: LayerDtypes, device: Any) -> Any:
    """A DynamicCache whose layers are initialized and empty, as the model's first update
    leaves them before concatenating (``dtypes[i]``: layer i's key and value dtypes, and its
    sliding window, 0 for none, as :func:`created_layers` lists them); an EncoderDecoderCache
    of two such caches for a pair of lists.

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
        window = kv[2] if kv is not None and len(kv) > 2 else 0
        layer = module.DynamicSlidingWindowLayer(window) if window else module.DynamicLayer()
        if kv is not None:
            layer.device = device
            layer.keys = torch.empty(0, dtype=kv[0], device=device)
            layer.values = torch.empty(0, dtype=kv[1], device=device)
            layer.is_initialized = True
            if window:
                layer._sliding_window_tensor = layer._sliding_window_tensor.to(device)
        cache.layers.append(layer)
    return cache


def created_layers(cache: Any) -> LayerDtypes:
    """What :func:`empty_cache` needs to make a cache like ``cache`` (which a model made)."""
    def each(layers: Any) -> List[Optional[Tuple[Any, ...]]]:
        return [(layer.keys.dtype, layer.values.dtype, window_of(layer)) if getattr(layer, "is_initialized", False)
                else None for layer in layers]

    if hasattr(cache, "cross_attention_cache"):
        return (each(cache.self_attention_cache.layers), each(cache.cross_attention_cache.layers))
    return each(cache.layers)


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
            def each(entries: List[Tuple[Any, ...]]) -> List[Tuple[Any, ...]]:
                return [tuple(convert(x) if isinstance(x, torch.Tensor) else x for x in entry) for entry in entries]

            state = CacheState(each(state.layers), state.windows, None if state.cross is None else each(state.cross))
        copied = new_cache(state)
        for i, layer in enumerate(cache_layers(copied)[:len(state.layers)]):  # a traced call takes the length as a tensor
            if state.window(i) and state.layers[i][0] is not None:
                setattr(layer, LENGTH_ATTRIBUTE, state.layers[i][2])
        return copied

    leaves, spec = _compat.tree_flatten(inputs)
    copied: Tuple[Tuple[Any, ...], Dict[str, Any]] = _compat.tree_unflatten([copy(x) if is_cache(x) else x for x in leaves],
                                                                            spec)
    return copied


__all__ = ["CacheState", "LENGTH_ATTRIBUTE", "LayerDtypes", "as_states", "cache_argument", "cache_layers",
           "caches_in", "copy_caches", "created_layers", "empty_cache", "is_cache", "length_tensor", "new_cache",
           "restore_caches", "skipped_window_mask", "to_state", "window_lengths", "window_of", "write_state"]
