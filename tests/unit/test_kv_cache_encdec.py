"""An encoder-decoder model's ``EncoderDecoderCache`` as a :class:`CacheState` with a cross
part: its pytree keys, a serialized spec through the loader's checks, the rebuilt cache and
its ``is_updated`` flags (oracle: transformers' own cache objects)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache

from graphpatch_cache import UnsupportedCacheError, _compat
from graphpatch_cache.integrations import kv_cache


def _cache(self_len=3, cross_len=5, layers=2):
    g = torch.Generator().manual_seed(0)
    own, cross = DynamicCache(), DynamicCache()
    for i in range(layers):
        own.update(torch.randn(2, 2, self_len, 4, generator=g), torch.randn(2, 2, self_len, 4, generator=g), i)
        cross.update(torch.randn(2, 2, cross_len, 4, generator=g), torch.randn(2, 2, cross_len, 4, generator=g), i)
    return EncoderDecoderCache(own, cross)


def test_state_keys_spec_round_trip_and_rebuilt_cache():
    cache = _cache()
    state = kv_cache.to_state(cache)
    paths, spec = _compat.tree_flatten_with_path(state)
    assert [p[0].key for p, _ in paths] == ["layer0_keys", "layer0_values", "layer1_keys", "layer1_values",
                                           "cross_layer0_keys", "cross_layer0_values", "cross_layer1_keys",
                                           "cross_layer1_values"]
    assert state["cross_layer1_values"] is cache.cross_attention_cache.layers[1].values
    # the serialized spec passes the loader's checks and loads back to the same structure
    loaded = _compat.treespec_loads(_compat.treespec_dumps(spec))
    rebuilt = kv_cache.new_cache(_compat.tree_unflatten([t for _, t in paths], loaded))
    assert type(rebuilt) is EncoderDecoderCache and rebuilt.is_updated == {0: True, 1: True}
    for part in ("self_attention_cache", "cross_attention_cache"):
        for a, b in zip(getattr(rebuilt, part).layers, getattr(cache, part).layers):
            assert a.keys is b.keys and a.values is b.values
    assert rebuilt.get_seq_length() == 3
    # a plain DynamicCache's state is unchanged: one layer count, no cross keys
    plain = kv_cache.to_state(cache.self_attention_cache)
    assert plain.cross is None and _compat.tree_flatten(plain)[1].context == 2


def test_an_empty_encoder_decoder_cache_and_flags_that_disagree_with_the_tensors():
    empty = EncoderDecoderCache(DynamicCache(), DynamicCache())
    state = kv_cache.to_state(empty)
    assert state.layers == [] and state.cross == []
    # filled by the model's first step: writing the state back marks the cross layers updated
    filled = kv_cache.to_state(_cache())
    assert kv_cache.write_state(empty, filled) is empty and empty.is_updated == {0: True, 1: True}
    bad = _cache()
    bad.is_updated[1] = False  # the model would compute layer 1's cross keys again; a graph would not
    with pytest.raises(UnsupportedCacheError, match=r"is_updated\[1\] is False") as info:
        kv_cache.to_state(bad)
    assert info.value.cache_class == "EncoderDecoderCache" and "as the model returned it" in info.value.hint
