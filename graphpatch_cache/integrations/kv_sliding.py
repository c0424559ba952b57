"""Sliding-window cache layers (``DynamicSlidingWindowLayer``: Mistral, Gemma 2/3, hybrid
``config.layer_types``) as graph inputs and outputs; :mod:`.kv_cache` uses these.

A sliding layer keeps, besides its last ``window - 1`` keys and values, a Python int
``cumulative_length`` (every token it has seen) that the model feeds into Python-level
arithmetic (positions, mask offsets) and one branch (``is_full``: ``length >= window``).
So its state carries two more leaves: the length as the size of a tensor that holds no data
(:func:`length_tensor`, a graph input whose size dynamo traces symbolically), and ``full``, a
constant of the call signature, so a graph traced while the window was filling is never used
once it is full, or the other way round (dynamo drops the guard it took on that branch).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

#: the attribute under which ``kv_cache.copy_caches`` gives a traced call a sliding layer's
#: :func:`length_tensor` (the route into the model's call reads it, then clears it)
LENGTH_ATTRIBUTE = "graphpatch_cache_length"


def window_of(layer: Any) -> int:
    """The sliding window of a cache layer, 0 for a plain one."""
    return int(layer.sliding_window) if getattr(layer, "is_sliding", False) else 0


def length_tensor(keys: torch.Tensor, length: Any) -> torch.Tensor:
    """A sliding layer's ``cumulative_length`` as the size of a tensor (one byte, expanded):
    how a graph takes and returns it. Traced, ``length`` may be a SymInt."""
    return keys.new_zeros((), dtype=torch.uint8).expand(length)


def skipped_window_mask(before: List[int], after: Any) -> Optional[str]:
    """Why a call that took sliding layers from lengths ``before`` (none: a new cache) to the
    cache ``after`` gives a graph only for its own sizes, or None.

    Why: when a call adds several tokens and its layer's window is still not reached, the
    model may skip the sliding mask (transformers' ``_ignore_causal_mask_sdpa``: is_causal
    instead of a mask), a branch on ``length + new tokens < window`` that dynamo guards and
    drops; the same graph would then run longer calls unmasked. One token at a time skips
    only where every cached token is in the window, so a decode graph stays shape-generic.
    """
    layers = getattr(after, "layers", None) or getattr(getattr(after, "self_attention_cache", None), "layers", [])
    windows = [(window_of(layer), int(layer.cumulative_length)) for layer in layers if window_of(layer)]
    for i, (window, length) in enumerate(windows):
        added = length - (before[i] if i < len(before) else 0)
        if added > 1 and length < window:
            return (f"{added} tokens entered a sliding window of {window} still filling ({length} tokens): "
                    f"the model may skip the window's mask, so the graph is fixed to these sizes")
    return None


__all__ = ["LENGTH_ATTRIBUTE", "length_tensor", "skipped_window_mask", "window_of"]
