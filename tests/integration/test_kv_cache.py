"""Key/value-cache calls and cached generation through the graph (``use_cache=True``).

Oracles: the unwrapped model's own outputs and caches (torch.equal), the model's own
``generate`` (with a logits processor or a forward hook doing what a patch does), and the
cache objects' identity (the caller's cache is updated in place, as the model does)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import DynamicCache

from tiny_models import generate_with_a_banned_token, tiny_gpt2, tiny_llama
from graphpatch_cache import (
    CacheStore,
    CustomPatch,
    PatchableGraph,
    ProbePatch,
    UnsupportedCacheError,
    ZeroPatch,
    load_cached,
)

pytestmark = pytest.mark.slow  # extracts GPT-2s and Llamas, generates


def _ids(batch=2, seq=6, seed=3):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def _same_cache(a, b):
    assert type(a) is DynamicCache and type(b) is DynamicCache
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def _copy(cache):
    return DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def cached_pg(request):
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    return model, PatchableGraph(model, input_ids=_ids(), use_cache=True)


def test_prefill_and_decode_equal_the_model_and_update_the_callers_cache(cached_pg):
    model, pg = cached_pg
    ids = _ids()
    ours, theirs = pg(input_ids=ids, use_cache=True), model(input_ids=ids, use_cache=True)
    assert torch.equal(ours.logits, theirs.logits)
    _same_cache(_cache_of(ours), _cache_of(theirs))
    mine, ref = _cache_of(ours), _cache_of(theirs)
    for step in range(4):  # one token at a time, the caches grow alike
        token = _ids(seq=1, seed=10 + step)
        ours = pg(input_ids=token, cache=mine, use_cache=True)
        theirs = model(input_ids=token, cache=ref, use_cache=True)
        assert torch.equal(ours.logits, theirs.logits)
        assert _cache_of(ours) is mine  # the caller's object, updated in place like the model's
        _same_cache(mine, ref)
        assert mine.get_seq_length() == 6 + step + 1
    # several new tokens at once onto a cache, and another batch size: still exact
    chunk = _ids(seq=3, seed=20)
    assert torch.equal(pg(input_ids=chunk, cache=mine, use_cache=True).logits,
                       model(input_ids=chunk, cache=ref, use_cache=True).logits)
    _same_cache(mine, ref)
    other = _ids(batch=3, seq=5, seed=4)
    a, b = pg(input_ids=other, use_cache=True), model(input_ids=other, use_cache=True)
    assert torch.equal(a.logits, b.logits)
    token = _ids(batch=3, seq=1, seed=5)
    assert torch.equal(pg(input_ids=token, cache=_cache_of(a), use_cache=True).logits,
                       model(input_ids=token, cache=_cache_of(b), use_cache=True).logits)


def test_extraction_leaves_the_example_cache_alone_and_cache_inputs_are_nodes(cached_pg):
    model, _ = cached_pg
    prefix = _cache_of(model(input_ids=_ids(), use_cache=True))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.layers]
    token = _ids(seq=1, seed=7)
    pg = PatchableGraph(model, input_ids=token, cache=prefix, use_cache=True)
    assert [layer.keys.shape[-2] for layer in prefix.layers] == [6] * len(before)  # not grown
    assert all(torch.equal(layer.keys, k) for layer, (k, _) in zip(prefix.layers, before))
    # the cached tensors are inputs of the root graph, by name, and patchable
    with pg.patch({"cache_layer0_keys": (probe := ProbePatch())}):
        pg(input_ids=token, cache=_copy(prefix), use_cache=True)
    assert torch.equal(probe.activation, before[0][0])
    # zeroing layer 0's cached values is what the model does with a zeroed cache
    zeroed = _copy(prefix)
    zeroed.layers[0].values = torch.zeros_like(zeroed.layers[0].values)
    expected = model(input_ids=token, cache=zeroed, use_cache=True).logits
    with pg.patch({"cache_layer0_values": ZeroPatch()}):
        got = pg(input_ids=token, cache=_copy(prefix), use_cache=True).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, model(input_ids=token, cache=_copy(prefix), use_cache=True).logits)


@pytest.mark.parametrize("padded", [False, True])
def test_cached_generate_equals_model_generate(cached_pg, padded):
    model, pg = cached_pg
    ids = _ids(seq=5)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0  # left padding: positions come from the mask, as model.generate does
    for use_cache in (True, False):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
                                  use_cache=use_cache, pad_token_id=0)
        got = pg.generate(ids, attention_mask=mask, max_new_tokens=7, use_cache=use_cache, pad_token_id=0)
        assert torch.equal(got, expected), use_cache


def test_cached_generate_applies_patches_at_every_step(cached_pg):
    model, pg = cached_pg
    ids = _ids(seq=5)
    mask = torch.ones_like(ids)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    banned = int(plain[0, -1])  # produced late: the ban must act on a decode step
    patched, oracle = generate_with_a_banned_token(pg, model, ids, mask, banned, use_cache=True)
    assert torch.equal(patched, oracle)
    assert banned not in patched[:, ids.shape[1]:].flatten().tolist()

    # a patch inside a block, against a forward hook on the unwrapped model (cached too)
    is_gpt2 = hasattr(model, "transformer")
    block = model.transformer.h[1].mlp if is_gpt2 else model.model.layers[1].mlp
    path = "transformer.h_1.mlp.output" if is_gpt2 else "model.layers_1.mlp.output"
    handle = block.register_forward_hook(lambda m, a, o: o * 40)
    try:
        oracle = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    finally:
        handle.remove()
    with pg.patch({path: CustomPatch(custom_op=lambda t: t * 40)}):
        patched = pg.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=True)
    assert torch.equal(patched, oracle)
    assert not torch.equal(patched, plain)


def test_cached_variants_come_from_the_cache_next_session(tmp_path):
    model = tiny_llama()
    store = CacheStore(tmp_path / "root", local_dir=tmp_path / "local")
    ids = _ids(seq=5)
    mask = torch.ones_like(ids)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
    first = load_cached(model, store=store, input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.equal(first.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True), expected)
    # the load call's graph, generate's prompt graph (with the position ids it passes, as
    # model.generate does) and the one-token-with-cache graph
    assert first.cache_stats.misses == 3
    second = load_cached(model, store=store, input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.equal(second.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True), expected)
    assert (second.cache_stats.hits, second.cache_stats.misses) == (3, 0)
    # and through a portable file: every variant travels, no extraction on the other side
    second.save(tmp_path / "graphs.json")
    third = PatchableGraph.load(tmp_path / "graphs.json", model)
    assert len(third.variants) == 3
    assert torch.equal(third.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True), expected)
    assert len(third.variants) == 3


def _tiny_mistral(sliding_window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, sliding_window=sliding_window,
                           bos_token_id=0, eos_token_id=0)
    return MistralForCausalLM(config).eval()


def test_unsupported_caches_raise_a_typed_error_naming_the_kind():
    """(Sliding-window caches go through the graph: see test_kv_sliding.py.)"""
    from transformers import StaticCache

    ids = _ids(seq=5)
    # a StaticCache passed to a graph of a plain model
    llama = tiny_llama()
    plain = PatchableGraph(llama, input_ids=ids, use_cache=True)
    static = StaticCache(config=llama.config, max_cache_len=16)
    with pytest.raises(UnsupportedCacheError, match="StaticCache") as info:
        plain(input_ids=ids, cache=static, use_cache=True)
    assert info.value.cache_class == "StaticCache" and "use_cache=False" in info.value.hint
    assert str(info.value).startswith("LlamaForCausalLM")  # names the family


def test_a_mistral_without_sliding_window_generates_with_its_cache():
    model = _tiny_mistral(sliding_window=None)
    ids = _ids(seq=5)
    pg = PatchableGraph(model, input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: the cache goes through the graph
        got = pg.generate(ids, max_new_tokens=5)
    assert torch.equal(got, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True))


def test_build_from_config_makes_the_decode_graph_a_hit(tmp_path):
    from graphpatch_cache import ExampleSignature, build

    model = tiny_llama()
    store = CacheStore(tmp_path / "root", local_dir=tmp_path / "local")
    from graphpatch_cache.cache.builder import BuildError

    for bad in (ExampleSignature(past_length=4), ExampleSignature(use_cache=True, past_length=1)):
        with pytest.raises(BuildError, match="needs use_cache=True and a length of at least 2") as info:
            build(model.config, store=store, signature=bad)
        assert "--past-length" in info.value.hint
    assert store.entries() == []
    signature = ExampleSignature(batch_size=2, seq_len=1, use_cache=True, past_length=4)
    result = build(model.config, store=store, signature=signature)
    assert not result.cached
    prefix = _cache_of(model(input_ids=_ids(seq=6), use_cache=True))
    token = _ids(seq=1, seed=9)
    pg = load_cached(model, store=store, input_ids=token, cache=_copy(prefix), use_cache=True)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    mine, ref = _copy(prefix), _copy(prefix)
    assert torch.equal(pg(input_ids=token, cache=mine, use_cache=True).logits,
                       model(input_ids=token, cache=ref, use_cache=True).logits)
    _same_cache(mine, ref)
    # the prompt's graph (the model makes the cache) built on the meta device: a hit, exact
    build(model.config, store=store, signature=ExampleSignature(batch_size=2, seq_len=6, use_cache=True,
                                                                attention_mask=True))
    ids, mask = _ids(seq=6), torch.ones(2, 6, dtype=torch.long)
    prompt = load_cached(model, store=store, input_ids=ids, attention_mask=mask, use_cache=True)
    assert (prompt.cache_stats.hits, prompt.cache_stats.misses) == (1, 0)
    ours, theirs = prompt(input_ids=ids, attention_mask=mask, use_cache=True), model(input_ids=ids, attention_mask=mask,
                                                                                      use_cache=True)
    assert torch.equal(ours.logits, theirs.logits)
    _same_cache(_cache_of(ours), _cache_of(theirs))
    # without store=, a transformers Cache passed as cache= is the model's argument, not a store
    default = load_cached(model, input_ids=token, cache=_copy(prefix), use_cache=True)
    assert default.cache_stats.misses == 1  # the default (isolated) store, not `store`
    assert torch.equal(default(input_ids=token, cache=_copy(prefix), use_cache=True).logits,
                       model(input_ids=token, cache=_copy(prefix), use_cache=True).logits)


def test_an_opaque_module_taking_the_cache_is_refused_and_generate_falls_back():
    from transformers.models.llama.modeling_llama import LlamaAttention

    from graphpatch_cache import ExtractionOptions

    model = tiny_llama(n_layer=1)
    ids = _ids(seq=5)
    options = ExtractionOptions(classes_to_skip_compiling=(LlamaAttention,))
    with pytest.raises(UnsupportedCacheError, match="model.layers.0.self_attn") as info:
        PatchableGraph(model, options, input_ids=ids, use_cache=True)
    assert info.value.cache_class == "LlamaAttention"
    pg = PatchableGraph(model, options, input_ids=ids, use_cache=False)  # fine without a cache
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    with pytest.warns(UserWarning, match="without a key/value cache"):
        assert torch.equal(pg.generate(ids, max_new_tokens=4), expected)


@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
def test_cached_generation_in_other_families(family):
    import transformers

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=0)).eval()
    ids = _ids(seq=6)
    mask = torch.ones_like(ids)
    pg = PatchableGraph(model, input_ids=ids, attention_mask=mask, use_cache=True)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(pg.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=True), expected)


def test_a_cached_calls_tree_names_batch_seq_and_the_past_length(cached_pg):
    # dynamo's s17/s27/s53 say nothing: the tree and _shape name them from the call's inputs
    model, pg = cached_pg
    prefix = _cache_of(model(input_ids=_ids(), use_cache=True))
    chunk = _ids(seq=3, seed=20)  # (seq > 1: a symbolic length, as a chunk onto a cache)
    call = {"input_ids": chunk, "cache": prefix, "use_cache": True}
    tree = pg.graph_for(**call)
    lines = repr(tree).splitlines()
    sizes = lines[1]
    assert sizes.startswith("sizes: batch = input_ids.shape[0] (s") and ", seq = input_ids.shape[1] (s" in sizes
    assert ", past = cache_layer0_keys.shape[2] (s" in sizes
    assert any(ln.endswith("input_ids: Tensor(int64)[batch, seq]") for ln in lines)
    assert any(re.search(r"cache_layer0_keys: Tensor\(float32\)\[batch, 2, past, (16|8)\]$", ln) for ln in lines)
    # a value whose length is the past plus the new tokens: named, and right for this call
    grown = [n for n, _, _ in tree._walk() if n._is_value and "past + seq" in repr(n._shape)]
    assert grown
    node = grown[0]
    with pg.patch({str(node): (probe := ProbePatch())}):
        pg(input_ids=chunk, cache=_copy(prefix), use_cache=True)
    shape = node._shape
    assert shape.at(**call) == probe.activation.shape
    assert shape.subs({"batch": 2, "seq": 3, "past": 6}) == probe.activation.shape
