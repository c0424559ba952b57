"""Routing a call's values through a marker operator while dynamo traces.

The recorder's forward wrapper passes every tensor a module call takes and returns through
a marker (:data:`~.markers.ENTER`, :data:`~.markers.EXIT`), so the flat graph shows which values
cross the call's boundary; :func:`route` does that for any nest of containers, ModelOutputs and
key/value cache objects, in pytree's leaf order.
"""

from __future__ import annotations

from typing import Any, List

import torch

from .. import _compat
from ..integrations import kv_cache


def _plain(value: Any) -> bool:
    """Only tensors, non-containers and plain tuple/list/dict nests (no ModelOutput)."""
    if type(value) in (tuple, list):
        for i in range(len(value)):
            if not _plain(value[i]):
                return False
        return True
    if type(value) is dict:
        for key in value:
            if not _plain(value[key]):
                return False
        return True
    return not isinstance(value, (tuple, list, dict))


def _collect(value: Any, out: List[Any]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif type(value) in (tuple, list):
        for i in range(len(value)):
            _collect(value[i], out)
    elif type(value) is dict:
        for key in value:
            _collect(value[key], out)


def _rebuild(value: Any, new: List[Any], pos: List[int]) -> Any:
    if isinstance(value, torch.Tensor):
        pos[0] += 1
        return new[pos[0] - 1]
    if type(value) is tuple:
        return tuple([_rebuild(value[i], new, pos) for i in range(len(value))])
    if type(value) is list:
        return [_rebuild(value[i], new, pos) for i in range(len(value))]
    if type(value) is dict:
        return {key: _rebuild(value[key], new, pos) for key in value}
    return value


def _route_caches(marker: Any, tag: str, value: Any, cls: Any) -> Any:
    """:func:`route` for a value holding key/value cache objects: the caches' tensors go
    through ``marker`` in the order of :func:`kv_cache.as_states` and the marker's outputs are
    written back into the same cache objects (the model mutates them in place, so the objects
    must stay the same).

    A sliding layer's length goes as a tensor too: into the call, the one
    :func:`kv_cache.copy_caches` attached (its size becomes the layer's ``cumulative_length``,
    a SymInt, and the attribute is cleared); out of it, one sized by ``cumulative_length``."""
    leaves, spec = _compat.tree_flatten(value)
    flat: List[Any] = []
    for i in range(len(leaves)):
        if isinstance(leaves[i], torch.Tensor):
            flat.append(leaves[i])
        elif isinstance(leaves[i], cls):
            for layer in kv_cache.cache_layers(leaves[i]):
                if layer.is_initialized:
                    flat.append(layer.keys)
                    flat.append(layer.values)
                    if kv_cache.window_of(layer):
                        given = getattr(layer, kv_cache.LENGTH_ATTRIBUTE, None)
                        flat.append(given if given is not None else
                                    kv_cache.length_tensor(layer.keys, layer.cumulative_length))
    new = marker(tag, flat)
    j = 0
    for i in range(len(leaves)):
        if isinstance(leaves[i], torch.Tensor):
            leaves[i] = new[j]
            j += 1
        elif isinstance(leaves[i], cls):
            for layer in kv_cache.cache_layers(leaves[i]):
                if layer.is_initialized:
                    layer.keys = new[j]
                    layer.values = new[j + 1]
                    j += 2
                    if kv_cache.window_of(layer):
                        layer.cumulative_length = new[j].shape[0]
                        setattr(layer, kv_cache.LENGTH_ATTRIBUTE, None)
                        j += 1
    return _compat.tree_unflatten(leaves, spec)


def _holds(cls: Any, value: Any) -> bool:
    """Whether an instance of ``cls`` is inside tuple/list/dict nests (ModelOutput included)
    of ``value``; walked by index, binding no tensor to a local (see :func:`route`)."""
    if isinstance(value, (tuple, list)):
        for i in range(len(value)):
            if _holds(cls, value[i]):
                return True
        return False
    if isinstance(value, dict):
        for key in value:
            if _holds(cls, value[key]):
                return True
        return False
    return isinstance(value, cls)


def route(marker: Any, tag: str, value: Any, caches: Any = None) -> Any:
    """Pass the tensor leaves of ``value`` through ``marker`` (while dynamo traces).

    No tensor is ever bound to a local variable here: dynamo names a node after the first
    variable it is stored in, and the nodes should keep the names the module's own code
    gives them (``mul_3``, ``attn_output``). Plain tuple/list/dict nests are walked by index
    for that reason (and because tracing pytree costs dynamo much more); anything else
    (``ModelOutput``) goes through pytree. Leaf order is pytree's in both cases. With
    ``caches`` (transformers' Cache class), key/value cache objects are routed too (see
    :func:`_route_caches`).
    """
    if caches is not None and _holds(caches, value):
        return _route_caches(marker, tag, value, caches)
    if isinstance(value, torch.Tensor):
        return marker(tag, [value])[0]
    if _plain(value):
        leaves: List[Any] = []
        _collect(value, leaves)
        return _rebuild(value, marker(tag, leaves), [0])
    leaves, spec = _compat.tree_flatten(value)
    idx = [i for i in range(len(leaves)) if isinstance(leaves[i], torch.Tensor)]
    new = marker(tag, [leaves[i] for i in idx])
    for j in range(len(idx)):
        leaves[idx[j]] = new[j]
    return _compat.tree_unflatten(leaves, spec)


__all__ = ["route"]
