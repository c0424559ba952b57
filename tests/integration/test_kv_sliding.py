"""Sliding-window and hybrid key/value caches through the graph (``DynamicSlidingWindowLayer``).

Oracles: the unwrapped model (its logits and its own cache objects, torch.equal; its own
``generate``, with a forward hook doing what a patch does; a forward pre-hook reading the
cache the model's attention takes). Windows are smaller than the generated length, so the
caches really slide. The configs use as many key/value heads as query heads: with fewer,
transformers' eager decode packs the query heads (``pack_gqa``) where a traced one repeats
the keys (``repeat_kv``), and the logits differ in the last bit (the tokens do not).
"""

from __future__ import annotations


import re
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from graphpatch_cache import CustomPatch, PatchableGraph, ProbePatch, UnsupportedCacheError

pytestmark = pytest.mark.slow  # extracts a prompt graph and a decode graph per family, generates

WINDOW = 4
NEW = 12  # new tokens: the window slides 8 times past its size


def _model(family, window=WINDOW):
    small = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128, sliding_window=window, bos_token_id=0, eos_token_id=0,
                 pad_token_id=0)
    config, cls = {
        "mistral": (lambda: transformers.MistralConfig(**small), transformers.MistralForCausalLM),
        "gemma2": (lambda: transformers.Gemma2Config(head_dim=8, **small), transformers.Gemma2ForCausalLM),
        # hybrid: a sliding layer, then a full one
        "gemma3": (lambda: transformers.Gemma3TextConfig(head_dim=8, layer_types=["sliding_attention", "full_attention"],
                                                         **small), transformers.Gemma3ForCausalLM),
        "qwen2": (lambda: transformers.Qwen2Config(use_sliding_window=True, max_window_layers=1, **small),
                  transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return cls(config()).eval()


def _ids(batch=2, seq=5, seed=3):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _sliding(cache):
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, DynamicSlidingWindowLayer)]


def _same_cache(a, b):
    assert [type(x) for x in a.layers] == [type(y) for y in b.layers]
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        assert getattr(x, "cumulative_length", None) == getattr(y, "cumulative_length", None)


@pytest.fixture(scope="module", params=["mistral", "gemma2", "gemma3", "qwen2"])
def family(request):
    model = _model(request.param)
    ids = _ids()
    pg = PatchableGraph(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return request.param, model, pg


def test_generate_goes_through_the_sliding_cache_and_equals_model_generate(family):
    name, model, pg = family
    ids = _ids()
    mask = torch.ones_like(ids)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to recomputing the sequence
        got = pg.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(got, expected)
    # the extraction call's, generate's prompt (it passes position ids, as model.generate
    # does) and one decode graph (a cache's tensors among its inputs) for all 12 steps, the
    # window full from the first
    assert len(pg.variants) == 3
    decode = pg.variants[2]
    assert any(leaf == {"kind": "const", "value": True} for leaf in decode.signature["leaves"])
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    assert _sliding(cache), name  # the family really has sliding layers
    if name in ("gemma3", "qwen2"):
        assert len(_sliding(cache)) == 1  # hybrid


def test_calls_equal_the_model_and_update_the_callers_sliding_cache(family):
    _, model, pg = family
    ids, mask = _ids(), torch.ones(2, 5, dtype=torch.long)
    ours = pg(input_ids=ids, attention_mask=mask, use_cache=True)
    theirs = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.equal(ours.logits, theirs.logits)
    mine, ref = ours.cache, theirs.cache
    _same_cache(mine, ref)
    for step in range(6):
        token = _ids(seq=1, seed=10 + step)
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=-1)
        a = pg(input_ids=token, attention_mask=mask, cache=mine, use_cache=True)
        b = model(input_ids=token, attention_mask=mask, cache=ref, use_cache=True)
        assert torch.equal(a.logits, b.logits), step
        assert a.cache is mine  # the caller's object, updated in place like the model's
        _same_cache(mine, ref)
    for i in _sliding(mine):  # the window slid: 11 tokens seen, the last WINDOW - 1 kept
        assert mine.layers[i].cumulative_length == 11 and mine.layers[i].keys.shape[-2] == WINDOW - 1


def test_a_probe_on_a_cached_key_tensor_at_decode_steps_sees_the_models_cache(family):
    _, model, pg = family
    ids, mask = _ids(), torch.ones(2, 5, dtype=torch.long)
    mine = pg(input_ids=ids, attention_mask=mask, use_cache=True).cache
    ref = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    layer = _sliding(ref)[0]
    token = _ids(seq=1, seed=7)
    # the decode graph (which has the cache inputs) must exist before a patch names its nodes;
    # whatever ran before on this module's fixture (tests may run in another order), make it
    spare = pg(input_ids=ids, attention_mask=mask, use_cache=True).cache
    pg(input_ids=token, attention_mask=torch.cat([mask, mask.new_ones(2, 1)], dim=-1), cache=spare, use_cache=True)
    for step in range(3):  # the keys each step finds in the cache: the model's, window-sized
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=-1)
        held = ref.layers[layer].keys.clone()
        with pg.patch({f"cache_layer{layer}_keys": (probe := ProbePatch())}):
            logits = pg(input_ids=token, attention_mask=mask, cache=mine, use_cache=True).logits
        model(input_ids=token, attention_mask=mask, cache=ref, use_cache=True)
        assert probe.activation.shape[-2] == WINDOW - 1
        assert torch.equal(probe.activation, held), step
        token = logits[:, -1:].argmax(-1)


def test_a_patch_at_every_step_changes_tokens_as_a_hook_does(family):
    _, model, pg = family
    ids = _ids()
    mask = torch.ones_like(ids)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=True)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: o * 40)
    try:
        oracle = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=True)
    finally:
        handle.remove()
    with pg.patch({"model.layers_1.mlp.output": CustomPatch(custom_op=lambda t: t * 40)}):
        patched = pg.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(patched, oracle)
    assert not torch.equal(patched, plain)


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)  # one hybrid family (the same graphs)
def test_sliding_graphs_travel_as_data(family, tmp_path):
    _, model, pg = family
    ids = _ids()
    mask = torch.ones_like(ids)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=True)
    pg.generate(ids, attention_mask=mask, max_new_tokens=2)  # generate's variants exist
    pg.save(tmp_path / "graphs.json")
    text = (tmp_path / "graphs.json").read_text()
    # the cache state's layer windows (a sliding one, a full one) are plain data in the spec
    assert re.search(r'"graphpatch_cache\.CacheState\\*", \\*"context\\*": \\*"\[4, 0\]', text)
    loaded = PatchableGraph.load(tmp_path / "graphs.json", model)
    count = len(pg.variants)
    assert len(loaded.variants) == count
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=NEW), expected)
    assert len(loaded.variants) == count  # no extraction


def test_a_window_still_filling_and_prompts_on_both_sides_of_it():
    """Window 6, prompt 2: the prompt's graph is fixed to its sizes (the model skips the
    window's mask there), decode steps take one graph while the window fills and one once
    it is full (the call signature tells them apart), and a longer prompt gets its own."""
    model = _model("mistral", window=6)
    ids = _ids(seq=2)
    pg = PatchableGraph(model, input_ids=ids, use_cache=True)
    assert "sliding window" in pg.variants[0].extraction["shape_specialized"][""]
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert torch.equal(pg.generate(ids, max_new_tokens=8), expected)
    # the extraction call's (no mask), generate's prompt (with the mask and positions it
    # passes, as model.generate does), filling, full
    assert len(pg.variants) == 4
    for seq in (3, 9):  # below and above the window: each exact
        longer = _ids(seq=seq, seed=seq)
        assert torch.equal(pg(input_ids=longer, use_cache=True).logits, model(input_ids=longer, use_cache=True).logits)


@pytest.mark.parametrize("family", ["mistral"], indirect=True)  # (the refusals do not depend on it)
def test_caches_that_cannot_go_through_a_graph_are_refused_with_a_typed_error(family):
    from transformers import StaticCache

    _, model, pg = family
    ids = _ids()
    cache = model(input_ids=ids, use_cache=True).cache
    for layer in cache.layers:  # assisted decoding's rollback keeps more than the window
        layer.activate_past_recording()
    with pytest.raises(UnsupportedCacheError, match="activate_past_recording") as info:
        pg(input_ids=_ids(seq=1), cache=cache, use_cache=True)
    assert info.value.cache_class == "DynamicSlidingWindowLayer" and "use_cache=False" in info.value.hint
    static = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(UnsupportedCacheError, match="StaticCache"):
        pg(input_ids=ids, cache=static, use_cache=True)
    with pytest.raises(UnsupportedCacheError, match="in place") as info:  # asked of generate
        pg.generate(ids, max_new_tokens=2, cache_implementation="static")
    assert info.value.cache_class == "static" and "cache_implementation" in info.value.hint
    assert isinstance(DynamicCache(config=model.config).layers[0], DynamicSlidingWindowLayer)
