"""Big-model paths on tiny models: builds from a config on the meta device, bitsandbytes
8-bit layers, accelerate offloading, and generation through the graph."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from tiny_models import generate_with_a_banned_token, tiny_gpt2, tiny_llama, token_inputs
from graphpatch_cache import (
    CacheStore,
    CustomPatch,
    ExampleSignature,
    ExtractionOptions,
    PatchableGraph,
    ProbePatch,
    SignatureMismatchError,
    ZeroPatch,
    build,
    load_cached,
)
from graphpatch_cache.cache.builder import BuildError, meta_model

pytestmark = pytest.mark.slow  # extracts GPT-2s and Llamas

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    model.save_pretrained(d)
    return d, model


def _store(tmp_path):
    return CacheStore(tmp_path / "root", local_dir=tmp_path / "local")


# -- build from a config ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_build_from_config_is_a_hit_for_from_pretrained(saved_llama, tmp_path, dtype):
    path, _ = saved_llama
    store = _store(tmp_path)
    config = LlamaConfig.from_pretrained(path)
    result = build(config, store=store, dtype=dtype)
    assert not result.cached and result.entry is not None
    meta = meta_model(config, dtype=dtype)  # what build traced: no weight memory at all
    assert all(p.device.type == "meta" for p in meta.parameters())
    kwargs = {"dtype": dtype} if dtype is not None else {}
    real = LlamaForCausalLM.from_pretrained(path, **kwargs).eval()
    inputs = ExampleSignature().inputs(real.config)
    pg = load_cached(real, store=store, **inputs)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    assert torch.equal(pg(**inputs).logits, real(**inputs).logits)
    more = {"input_ids": torch.randint(0, 128, (1, 13)), "use_cache": False}
    assert torch.equal(pg(**more).logits, real(**more).logits)
    assert build(config, store=store, dtype=dtype).cached  # a second build finds it


def test_build_bad_input_writes_nothing(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(BuildError, match="config"):
        build(object(), store=store)
    with pytest.raises(BuildError, match="quantization"):
        build(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                          vocab_size=64), store=store, quantization="3bit")
    from transformers import PretrainedConfig

    class UnknownConfig(PretrainedConfig):
        model_type = "graphpatch-unknown"

    with pytest.raises(BuildError, match="UnknownConfig") as info:
        build(UnknownConfig(), store=store)
    assert info.value.hint
    assert store.entries() == []


def test_build_checks_the_device_map_before_extracting(tmp_path):
    store = _store(tmp_path)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=64)
    good = {"model.embed_tokens": "cpu", "model.layers.0": 0, "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(BuildError, match="model.layers.7") as info:  # a layer this config lacks
        build(config, store=store, device_map=dict(good, **{"model.layers.7": "cpu"}))
    assert "model.layers.1" in info.value.hint  # close matches
    with pytest.raises(BuildError, match="not a device"):
        build(config, store=store, device_map=dict(good, lm_head="gpu-please"))
    partial = {k: v for k, v in good.items() if k != "model.layers.1"}
    with pytest.raises(BuildError, match="model.layers.1.*") as info:
        build(config, store=store, device_map=partial)
    assert "add" in info.value.hint
    assert store.entries() == []  # nothing written for a bad map
    # a good map (or a strategy) builds the one entry that serves every map
    first = build(config, store=store, device_map=good)
    assert not first.cached
    assert build(config, store=store, device_map="auto").cached
    assert build(config, store=store).cached and len(store.entries()) == 1


def test_8bit_build_without_bitsandbytes_is_a_typed_error(tmp_path, monkeypatch):
    import sys

    store = _store(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    with pytest.raises(BuildError, match="bitsandbytes") as info:
        build(config, store=store, quantization="8bit")
    assert "pip install" in info.value.hint
    assert store.entries() == []


# -- bitsandbytes 8-bit -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_8bit(saved_llama):
    path, _ = saved_llama
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    inputs = token_inputs()
    return model, inputs, PatchableGraph(model, **inputs)


def test_8bit_exact_identity_and_shape_generic(llama_8bit):
    import bitsandbytes as bnb

    model, inputs, pg = llama_8bit
    assert pg.artifact.extraction["opaque"] == {}
    assert torch.equal(pg(**inputs).logits, model(**inputs).logits)
    other = token_inputs(3, 5)
    assert torch.equal(pg(**other).logits, model(**other).logits)
    assert len(pg.variants) == 1
    lin = model.model.layers[0].mlp.gate_proj
    assert isinstance(lin, bnb.nn.Linear8bitLt)
    bound = pg._variants[0].root.model.layers_0.mlp.gate_proj.weight
    assert bound is lin.weight and bound.dtype == torch.int8 and bound.data_ptr() == lin.weight.data_ptr()


def test_8bit_weight_probe_is_dequantized_and_patch_matches_oracle(llama_8bit):
    import bitsandbytes.functional as F

    model, inputs, pg = llama_8bit
    lin = model.model.layers[0].mlp.gate_proj
    # bitsandbytes keeps the row scales on the weight until the layer first runs, then moves
    # them to lin.state: read them wherever they are now (the graph must do the same)
    scales = lin.weight.SCB if getattr(lin.weight, "SCB", None) is not None else lin.state.SCB
    expected_w = F.int8_vectorwise_dequant(lin.weight.data, scales)
    int8_before = lin.weight.data.clone()
    reference = model(**inputs).logits
    with pg.patch({"model.layers_0.mlp.gate_proj.weight": (probe := ProbePatch())}):
        probed = pg(**inputs).logits
    assert torch.equal(probe.activation, expected_w)
    assert torch.equal(probed, reference)  # looking does not leave the int8 path
    seen = {}
    handle = lin.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    model(**inputs)
    handle.remove()
    delta = torch.full_like(expected_w, 0.01)
    with pg.patch({"model.layers_0.mlp.gate_proj.weight": CustomPatch(custom_op=lambda w: w + delta),
                   "model.layers_0.mlp.gate_proj.output": (out := ProbePatch())}):
        pg(**inputs)
    oracle = torch.nn.functional.linear(seen["x"], expected_w + delta)
    assert torch.equal(out.activation, oracle)
    assert torch.equal(lin.weight.data, int8_before)  # the patch left the int8 data alone
    assert torch.equal(pg(**inputs).logits, reference)


def test_8bit_cast_notice_is_quiet_in_our_calls_only(llama_8bit):
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." (a log record, not a Python
    # warning) on every call of every 8-bit layer with a float32 input: 14 per call of this
    # model. Our graph calls show it once per process at most; the user's own calls of the
    # model, the user's logging and warnings setup are untouched.
    import logging

    import bitsandbytes as bnb

    model, inputs, pg = llama_8bit
    layers = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    seen: list = []

    class UserFilter(logging.Filter):  # a filter the user put there: must keep seeing records
        def filter(self, record):
            seen.append(record.getMessage())
            return True

    pg(**inputs)  # our filter is added on a graph's first 8-bit call: before the user's, as after any use
    user_filter = UserFilter()
    logger.addFilter(user_filter)
    warning_filters = list(warnings.filters)
    level, propagate = logger.level, logger.propagate
    try:
        pg(**inputs)  # the first notice in this process may show here, once
        assert sum("MatMul8bitLt" in m for m in seen) <= 1
        seen.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pg.patch({"model.layers_0.mlp.up_proj.output": ProbePatch()}):
                pg(**inputs)
            pg(**inputs)
        assert not [m for m in seen if "MatMul8bitLt" in m]
        assert not [w for w in caught if "MatMul8bitLt" in str(w.message) or "bitsandbytes" in w.filename]
        model(**inputs)  # the user's own call: bitsandbytes logs as it always does
        assert sum("MatMul8bitLt" in m for m in seen) == layers == 14
    finally:
        logger.removeFilter(user_filter)
    assert warnings.filters == warning_filters
    assert (logger.level, logger.propagate) == (level, propagate) and user_filter not in logger.filters


def test_8bit_cast_notice_is_quiet_inside_an_opaque_module_too(saved_llama):
    # an opaque MLP runs its 8-bit linears itself (no leaf graph of ours around each): the
    # notice is still quieted for the graph's call, and the user's own call logs it per layer
    import logging

    from transformers.models.llama.modeling_llama import LlamaMLP

    path, _ = saved_llama
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    inputs = token_inputs()
    pg = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(LlamaMLP,)), **inputs)
    assert {g.module_path: g.kind for g in pg.artifact.root.walk()}["model.layers.0.mlp"] == "opaque"
    emitted: list = []

    class Count(logging.Handler):  # what reaches a handler (filters have had their say)
        def emit(self, record):
            emitted.append(record.getMessage())

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    handler = Count()
    logger.addHandler(handler)
    try:
        pg(**inputs)  # the first notice in this process may show here, once
        emitted.clear()
        out = pg(**inputs).logits
        assert not [m for m in emitted if "MatMul8bitLt" in m]
        assert torch.equal(out, model(**inputs).logits)
        assert sum("MatMul8bitLt" in m for m in emitted) == 14  # the user's own call, every layer
    finally:
        logger.removeHandler(handler)


def test_8bit_load_cached_and_meta_build_hit(saved_llama, llama_8bit, tmp_path):
    path, _ = saved_llama
    model, inputs, _ = llama_8bit
    store = _store(tmp_path)
    config = LlamaConfig.from_pretrained(path)
    build(config, store=store, quantization="8bit")
    example = ExampleSignature().inputs(model.config)
    pg = load_cached(model, store=store, **example)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    assert torch.equal(pg(**example).logits, model(**example).logits)
    assert pg._variants[0].root.model.layers_1.mlp.up_proj.weight is model.model.layers[1].mlp.up_proj.weight


# -- accelerate ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def offloaded(saved_llama, tmp_path_factory):
    path, original = saved_llama
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = LlamaForCausalLM.from_pretrained(path, device_map=device_map,
                                             offload_folder=str(tmp_path_factory.mktemp("offload"))).eval()
    return model, original


def test_offloaded_model_exact_and_weights_stay_offloaded(offloaded, tmp_path):
    model, original = offloaded
    inputs = token_inputs()
    gate = model.model.layers[1].mlp.gate_proj
    assert gate.weight.device.type == "meta"  # offloaded to disk
    pg = load_cached(model, store=_store(tmp_path), **inputs)
    assert gate.weight.device.type == "meta"  # binding did not load it
    assert pg.artifact.extraction["opaque"] == {}
    assert torch.equal(pg(**inputs).logits, original(**inputs).logits)
    assert gate.weight.device.type == "meta"  # and the hooks offloaded it again after the forward
    other = token_inputs(3, 5)
    assert torch.equal(pg(**other).logits, original(**other).logits)
    again = load_cached(model, store=_store(tmp_path), **inputs)
    assert again.cache_stats.hits == 1 and torch.equal(again(**inputs).logits, original(**inputs).logits)


def test_offloaded_probes_and_patches(offloaded, tmp_path):
    model, original = offloaded
    inputs = token_inputs()
    pg = PatchableGraph(model, **inputs)
    seen = {}
    handle = original.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(o=o.detach()))
    original(**inputs)
    handle.remove()
    with pg.patch({"model.layers_1.mlp.down_proj.output": (probe := ProbePatch()),
                   "model.layers_1.mlp.gate_proj.weight": (weight := ProbePatch())}):
        pg(**inputs)
    assert torch.equal(probe.activation, seen["o"])
    assert torch.equal(weight.activation, original.model.layers[1].mlp.gate_proj.weight)
    handle = original.model.layers[1].mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    expected = original(**inputs).logits
    handle.remove()
    with pg.patch({"model.layers_1.mlp.output": ZeroPatch()}):
        assert torch.equal(pg(**inputs).logits, expected)


# -- generate -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_generate_equals_model_generate_and_patches_every_step(make):
    model = make()
    inputs = token_inputs()
    pg = PatchableGraph(model, **inputs)
    ids, mask = inputs["input_ids"], torch.ones_like(inputs["input_ids"])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(pg.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False), expected)
    banned = int(expected[0, ids.shape[1]])
    patched, oracle = generate_with_a_banned_token(pg, model, ids, mask, banned, use_cache=False)
    assert torch.equal(patched, oracle)
    assert banned not in patched[:, ids.shape[1]:].flatten().tolist()
    with pytest.raises(SignatureMismatchError, match="greedily"):
        pg.generate(ids, max_new_tokens=2, do_sample=True)
    # use_cache=True (the default here, as for the model): see test_kv_cache.py


def test_gpt2_8bit_exact_and_meta_build_hit(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2",
                                            quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    store = _store(tmp_path)
    build(GPT2Config.from_pretrained(tmp_path / "gpt2"), store=store, quantization="8bit")
    inputs = ExampleSignature().inputs(model.config)
    pg = load_cached(model, store=store, **inputs)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    assert torch.equal(pg(**inputs).logits, model(**inputs).logits)
    other = token_inputs(3, 5)
    assert torch.equal(pg(**other).logits, model(**other).logits)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert pg._variants[0].root.transformer.h_0.mlp.c_fc.weight is c_fc.weight


def test_offloaded_cached_generation(offloaded, tmp_path):
    model, original = offloaded
    ids = token_inputs(2, 5)["input_ids"]
    mask = torch.ones_like(ids)
    gate = model.model.layers[1].mlp.gate_proj
    expected = original.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
    pg = load_cached(model, store=_store(tmp_path), input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.equal(pg.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True), expected)
    assert gate.weight.device.type == "meta"  # still offloaded after every step
    with pg.patch({"model.layers_1.mlp.output": CustomPatch(custom_op=lambda t: t * 40)}):
        patched = pg.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True)
    handle = original.model.layers[1].mlp.register_forward_hook(lambda m, a, o: o * 40)
    try:
        oracle = original.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
    finally:
        handle.remove()
    assert torch.equal(patched, oracle)


def test_8bit_cached_generation(llama_8bit):
    model = llama_8bit[0]
    ids = token_inputs(2, 5)["input_ids"]
    mask = torch.ones_like(ids)
    pg = PatchableGraph(model, input_ids=ids, attention_mask=mask, use_cache=True)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(pg.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True), expected)
    # the dequantized weight of an 8-bit linear, patched at every step, against the model
    # running with that weight zeroed (its own generate, cached)
    layers = model.model.layers
    with pg.patch({f"model.layers_{i}.{name}.weight": ZeroPatch()
                   for i in range(len(layers)) for name in ("mlp.down_proj", "self_attn.o_proj")}):
        patched = pg.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True)
    handles = [module.register_forward_hook(lambda m, a, o: torch.zeros_like(o))  # no biases in Llama
               for layer in layers for module in (layer.mlp.down_proj, layer.self_attn.o_proj)]
    try:
        oracle = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(patched, oracle)
    assert not torch.equal(patched, expected)
