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

Only ``DynamicCache`` is supported, made of plain ``DynamicLayer`` s (grown by concatenation,
so one shape-generic graph serves every step) and ``DynamicSlidingWindowLayer`` s (Mistral,
Gemma 2/3, hybrid ``config.layer_types``; see below). Other caches raise
:class:`~graphpatch_cache.errors.UnsupportedCacheError` naming the class and the workaround.

A sliding layer keeps, besides its last ``window - 1`` keys and values, a Python int
``cumulative_length`` (every token it has seen) that the model feeds into Python-level
arithmetic (positions, mask offsets) and one branch (``is_full``: ``length >= window``).
So its state carries two more leaves: the length as the size of a tensor that holds no data
(``length_tensor``, a graph input whose size dynamo traces symbolically), and ``full``, a
constant of the call signature, so a graph traced while the window was filling is never used
once it is full, or the other way round (dynamo drops the guard it took on that branch).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import _compat
from ..errors import UnsupportedCacheError


#: the names of a layer's leaves: a plain layer's first two, a sliding layer's all four
_FIELDS = ("keys", "values", "length", "full")


class CacheState:
    """The tensors of a ``DynamicCache``: ``layers[i] = (keys, values)`` (None while a layer
    is still empty), or ``(keys, values, length, full)`` for a sliding-window layer
    (``windows[i]`` its window, 0 for a plain layer; see the module's docstring). A pytree
    node, serialized as ``graphpatch_cache.CacheState`` (context: the number of layers, or
    the list of windows when a layer slides)."""

    def __init__(self, layers: List[Tuple[Any, ...]], windows: Optional[List[int]] = None) -> None:
        self.layers = [tuple(kv) for kv in layers]
        self.windows = [int(w) for w in windows] if windows and any(windows) else None

    def window(self, i: int) -> int:
        return self.windows[i] if self.windows is not None else 0

    def __getitem__(self, name: str) -> Any:
        """``state["layer3_keys"]``: one leaf by its pytree key (graphs read a child call's
        returned cache this way)."""
        layer, _, which = str(name).partition("_")
        if not layer.startswith("layer") or which not in _FIELDS:
            raise KeyError(name)
        entry = self.layers[int(layer[5:])]
        if _FIELDS.index(which) >= len(entry):
            raise KeyError(name)
        return entry[_FIELDS.index(which)]

    def __repr__(self) -> str:
        shapes = [tuple(entry[0].shape) if isinstance(entry[0], torch.Tensor) else None for entry in self.layers]
        return f"CacheState(layers={len(self.layers)}, key shapes={shapes})"


def _flatten(state: CacheState) -> Tuple[List[Any], Any]:
    leaves: List[Any] = []
    for entry in state.layers:
        leaves.extend(entry)
    return leaves, len(state.layers) if state.windows is None else list(state.windows)


def _unflatten(leaves: Any, context: Any) -> CacheState:
    leaves = list(leaves)
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
    for i, entry in enumerate(state.layers):
        keys.extend(_compat.MappingKey(f"layer{i}_{field}") for field in _FIELDS[:len(entry)])
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


def to_state(cache: Any) -> CacheState:
    """The tensors of ``cache`` (checked to be a supported cache)."""
    _check(cache)
    layers: List[Tuple[Any, ...]] = []
    for layer in cache.layers:
        window = window_of(layer)
        if not getattr(layer, "is_initialized", False):
            layers.append((None,) * (4 if window else 2))
        elif window:
            length = layer.cumulative_length
            layers.append((layer.keys, layer.values, length_tensor(layer.keys, length), length >= window))
        else:
            layers.append((layer.keys, layer.values))
    return CacheState(layers, [window_of(layer) for layer in cache.layers])


def window_of(layer: Any) -> int:
    """The sliding window of a cache layer, 0 for a plain one."""
    return int(layer.sliding_window) if getattr(layer, "is_sliding", False) else 0


def length_tensor(keys: torch.Tensor, length: Any) -> torch.Tensor:
    """A sliding layer's ``cumulative_length`` as the size of a tensor (one byte, expanded):
    how a graph takes and returns it. Traced, ``length`` may be a SymInt."""
    return keys.new_zeros((), dtype=torch.uint8).expand(length)


def window_lengths(value: Any) -> List[int]:
    """The ``cumulative_length`` of every sliding layer of the first cache in ``value`` (0 for
    a layer not yet filled; empty without a cache or a sliding layer)."""
    caches = caches_in(value)
    if not caches:
        return []
    return [int(getattr(layer, "cumulative_length", 0)) for layer in caches[0].layers if window_of(layer)]


def skipped_window_mask(before: List[int], after: Any) -> Optional[str]:
    """Why a call that took sliding layers from lengths ``before`` (none: a new cache) to the
    cache ``after`` gives a graph only for its own sizes, or None.

    Why: when a call adds several tokens and its layer's window is still not reached, the
    model may skip the sliding mask (transformers' ``_ignore_causal_mask_sdpa``: is_causal
    instead of a mask), a branch on ``length + new tokens < window`` that dynamo guards and
    drops; the same graph would then run longer calls unmasked. One token at a time skips
    only where every cached token is in the window, so a decode graph stays shape-generic.
    """
    windows = [(window_of(layer), int(layer.cumulative_length)) for layer in after.layers if window_of(layer)]
    for i, (window, length) in enumerate(windows):
        added = length - (before[i] if i < len(before) else 0)
        if added > 1 and length < window:
            return (f"{added} tokens entered a sliding window of {window} still filling ({length} tokens): "
                    f"the model may skip the window's mask, so the graph is fixed to these sizes")
    return None


#: the attribute under which :func:`copy_caches` gives a traced call a sliding layer's
#: :func:`length_tensor` (the route into the model's call reads it, then clears it)
LENGTH_ATTRIBUTE = "graphpatch_cache_length"


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
    """Put ``state``'s tensors into ``cache`` (a DynamicCache), as the model's own update would
    (a sliding layer's length too; missing layers are made of the state's kinds)."""
    module = _cache_module()
    while len(cache.layers) < len(state.layers):
        window = state.window(len(cache.layers))
        cache.layers.append(module.DynamicSlidingWindowLayer(window) if window else module.DynamicLayer())
    for i, (layer, entry) in enumerate(zip(cache.layers, state.layers)):
        if entry[0] is None:
            continue
        layer.keys, layer.values = entry[0], entry[1]
        layer.device = entry[0].device
        layer.is_initialized = True
        if state.window(i):
            layer.cumulative_length = int(entry[2].shape[0])
            layer._sliding_window_tensor = layer._sliding_window_tensor.to(layer.device)
    return cache


def new_cache(state: CacheState) -> Any:
    """A new DynamicCache holding ``state``'s tensors."""
    module = _cache_module()
    if module is None:  # pragma: no cover - a CacheState only comes from a transformers model
        raise UnsupportedCacheError("transformers is not imported; cannot build a DynamicCache")
    cache = module.DynamicCache()
    return write_state(cache, state)


def empty_cache(dtypes: List[Optional[Tuple[Any, ...]]], device: Any) -> Any:
    """A DynamicCache whose layers are initialized and empty, as the model's first update
    leaves them before concatenating (``dtypes[i]``: layer i's key and value dtypes, and its
    sliding window, 0 for none, as :func:`created_layers` lists them).

    Why: dynamo (torch 2.13) folds ``torch.tensor([], device="meta")``, which
    ``DynamicLayer.lazy_initialization`` calls, into a real meta tensor that fake tensors then
    refuse; ``torch.empty(0)`` traces fine. Extraction of an accelerate-hooked model (traced
    on the meta device) hands the model this cache where the model would create its own.
    """
    module = _cache_module()
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


def created_layers(cache: Any) -> List[Optional[Tuple[Any, ...]]]:
    """What :func:`empty_cache` needs to make a cache like ``cache`` (which a model made)."""
    return [(layer.keys.dtype, layer.values.dtype, window_of(layer)) if getattr(layer, "is_initialized", False)
            else None for layer in cache.layers]


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
            state = CacheState([tuple(convert(x) if isinstance(x, torch.Tensor) else x for x in entry)
                                for entry in state.layers], state.windows)
        copied = new_cache(state)
        for i, layer in enumerate(copied.layers):  # a traced call takes the length as a tensor
            if state.window(i) and state.layers[i][0] is not None:
                setattr(layer, LENGTH_ATTRIBUTE, state.layers[i][2])
        return copied

    leaves, spec = _compat.tree_flatten(inputs)
    copied: Tuple[Tuple[Any, ...], Dict[str, Any]] = _compat.tree_unflatten([copy(x) if is_cache(x) else x for x in leaves],
                                                                            spec)
    return copied


__all__ = [
    "CacheState",
    "as_states",
    "LENGTH_ATTRIBUTE",
    "copy_caches",
    "cache_argument",
    "created_layers",
    "empty_cache",
    "length_tensor",
    "window_of",
    "caches_in",
    "is_cache",
    "new_cache",
    "skipped_window_mask",
    "window_lengths",
    "restore_caches",
    "to_state",
    "write_state",
]
