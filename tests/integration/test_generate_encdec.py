"""Encoder-decoder generation through the graph (T5, BART, Whisper): the encoder runs once,
the decoder steps with its self- and cross-attention caches.

Oracles: the unwrapped model's own ``generate`` (token for token), forward hooks on the
unwrapped model (how often its encoder runs; what a patch on a decoder MLP does at every step),
and the store's hit and miss counts for a fresh ``load_cached``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest
import torch
import transformers as T

from graphpatch_cache import CacheStore, CustomPatch, load_cached

pytestmark = pytest.mark.slow  # extracts three encoder-decoder models, generates

NEW = 6  # new tokens per generate call


@dataclass
class Case:
    name: str
    model: Any
    pg: Any
    store: CacheStore
    inputs: Dict[str, torch.Tensor]  # the model's main input (and attention mask)
    example: Dict[str, Any]  # the call pg was built from
    encoder_node: str  # a node in the encoder's graph
    decoder_embed: str  # the decoder's token embedding output
    decoder_mlp: str  # a decoder MLP's output, and the module a hook patches alike
    decoder_mlp_module: Any


def _t5():
    torch.manual_seed(0)
    config = T.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2, vocab_size=128,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=8.0)
    model = T.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, (
        "encoder.block_1.layer_1.DenseReluDense.wo.output", "decoder.embed_tokens.output",
        "decoder.block_1.layer_2.DenseReluDense.output", model.decoder.block[1].layer[2].DenseReluDense)


def _bart():
    torch.manual_seed(0)
    config = T.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                          init_std=0.2)  # (forced_eos_token_id=2 by default: the last token is forced)
    model = T.BartForConditionalGeneration(config).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # padding in the encoder's input
    return model, {"input_ids": ids, "attention_mask": mask}, (
        "model.encoder.layers_1.fc2.output", "model.decoder.embed_tokens.output", "model.decoder.layers_1.fc2.output",
        model.model.decoder.layers[1].fc2)


def _whisper():
    torch.manual_seed(0)
    config = T.WhisperConfig(vocab_size=128, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32,
                             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_source_positions=8, max_target_positions=32, init_std=0.5,
                             decoder_start_token_id=3, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                             begin_suppress_tokens=None, suppress_tokens=None)
    model = T.WhisperForConditionalGeneration(config).eval()
    model.generation_config.begin_suppress_tokens = None  # (its default names tokens of the real vocabulary)
    # input features: (batch, mel bins, 2 * max_source_positions frames)
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    return model, {"input_features": features}, (
        "model.encoder.layers_1.fc2.output", "model.decoder.embed_tokens.output", "model.decoder.layers_1.fc2.output",
        model.model.decoder.layers[1].fc2)


@pytest.fixture(scope="module", params=["t5", "bart", "whisper"])
def case(request, tmp_path_factory):
    model, inputs, (encoder_node, embed, mlp, mlp_module) = {"t5": _t5, "bart": _bart, "whisper": _whisper}[
        request.param]()
    root = tmp_path_factory.mktemp(request.param)
    store = CacheStore(root / "store", local_dir=root / "local")
    start = torch.full((2, 1), model.generation_config.decoder_start_token_id, dtype=torch.long)
    example = dict(inputs, decoder_input_ids=start, use_cache=True)
    pg = load_cached(model, store=store, **example)
    return Case(request.param, model, pg, store, inputs, example, encoder_node, embed, mlp, mlp_module)


def _model_generate(case: Case, **kwargs: Any) -> torch.Tensor:
    out = case.model.generate(**case.inputs, max_new_tokens=NEW, do_sample=False, **kwargs)
    if case.name == "whisper":  # Whisper's generate returns the new tokens only
        start = torch.full((out.shape[0], 1), case.model.generation_config.decoder_start_token_id, dtype=out.dtype)
        out = torch.cat([start, out], dim=-1)
    return out


def _generate(case: Case, **kwargs: Any) -> torch.Tensor:
    main = next(iter(case.inputs))
    return case.pg.generate(case.inputs[main], case.inputs.get("attention_mask"), max_new_tokens=NEW, **kwargs)


def _counting_hook(module: Any, calls: List[int]) -> Any:
    return module.register_forward_hook(lambda m, a, o: calls.append(1))


def test_generate_equals_model_generate_with_the_encoder_run_once_and_the_cache(case):
    encoder_runs: List[int] = []
    handle = _counting_hook(case.model.get_encoder(), encoder_runs)
    try:
        expected = _model_generate(case, use_cache=True)
    finally:
        handle.remove()
    assert expected.shape[1] == NEW + 1 and len(set(expected[:, 1:].flatten().tolist())) > 1
    assert len(encoder_runs) == 1  # the oracle's own count

    ours: List[int] = []
    lengths: List[int] = []

    def count(t: torch.Tensor) -> torch.Tensor:
        ours.append(1)
        return t

    def length(t: torch.Tensor) -> torch.Tensor:
        lengths.append(t.shape[1])
        return t

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fall back to steps without a cache
        with case.pg.patch({case.encoder_node: CustomPatch(custom_op=count),
                            case.decoder_embed: CustomPatch(custom_op=length)}):
            got = _generate(case)
    assert torch.equal(got, expected)
    assert len(ours) == 1  # the encoder's graph ran once, in the first step
    assert lengths == [1] * NEW  # every step fed the decoder one token: the caches carry the rest
    # the later steps' graphs take both caches' tensors as inputs (and no encoder graph)
    later = [v for v in case.pg.variants if any(n.name == "cache_cross_layer1_keys" for n in v.root.nodes)]
    assert len(later) == 2  # one token cached (dynamo specializes size 1), then any length
    assert all(not any(c.name == "encoder" or c.name.endswith("encoder") for c in _graphs(v.root)) for v in later)
    # and a second call again runs the encoder once
    with case.pg.patch({case.encoder_node: CustomPatch(custom_op=count)}):
        assert torch.equal(_generate(case, use_cache=True), expected)
    assert len(ours) == 2


def _graphs(graph: Any) -> List[Any]:
    out = []
    for child in graph.children:
        out.append(child)
        out.extend(_graphs(child))
    return out


def test_a_patch_on_a_decoder_mlp_acts_at_every_step_like_a_forward_hook(case):
    plain = _model_generate(case, use_cache=True)
    handle = case.decoder_mlp_module.register_forward_hook(lambda m, a, o: o * 25)
    try:
        oracle = _model_generate(case, use_cache=True)
    finally:
        handle.remove()
    with case.pg.patch({case.decoder_mlp: CustomPatch(custom_op=lambda t: t * 25)}):
        patched = _generate(case, use_cache=True)
    assert torch.equal(patched, oracle)
    assert not torch.equal(patched, plain)


def test_a_fresh_load_cached_hits_and_generates_the_same(case):
    expected = _model_generate(case, use_cache=True)
    assert torch.equal(_generate(case, use_cache=True), expected)  # (the fixture's graphs are stored)
    again = load_cached(case.model, store=case.store, **case.example)
    assert torch.equal(_generate_with(again, case), expected)
    assert (again.cache_stats.hits, again.cache_stats.misses) == (3, 0)
    assert len(again.variants) == 3


def _generate_with(pg: Any, case: Case) -> torch.Tensor:
    main = next(iter(case.inputs))
    return pg.generate(case.inputs[main], case.inputs.get("attention_mask"), max_new_tokens=NEW, use_cache=True)


def test_unsupported_generation_settings_are_refused_by_name(case):
    from graphpatch_cache import SignatureMismatchError

    saved: Optional[int] = case.pg.generation_config.no_repeat_ngram_size
    case.pg.generation_config.no_repeat_ngram_size = 2
    try:
        with pytest.raises(SignatureMismatchError, match="no_repeat_ngram_size=2") as info:
            _generate(case, use_cache=True)
        assert "pg.generation_config.no_repeat_ngram_size = None" in info.value.hint
    finally:
        case.pg.generation_config.no_repeat_ngram_size = saved


@pytest.mark.parametrize("case", ["t5"], indirect=True)  # (the same T5 as above: two more graphs)
def test_without_a_cache_the_encoder_still_runs_once(case):
    expected = _model_generate(case, use_cache=False)
    runs: List[int] = []
    lengths: List[int] = []
    with case.pg.patch({case.encoder_node: CustomPatch(custom_op=lambda t: (runs.append(1), t)[1]),
                        case.decoder_embed: CustomPatch(custom_op=lambda t: (lengths.append(t.shape[1]), t)[1])}):
        got = _generate(case, use_cache=False)
    assert torch.equal(got, expected)
    assert runs == [1] and lengths == list(range(1, NEW + 1))  # the whole decoder sequence, every step


def test_the_first_steps_graph_builds_from_a_config_on_the_meta_device(tmp_path):
    """Traced on the meta device (a build from a config; accelerate-hooked models), the model
    is handed an empty EncoderDecoderCache where it makes its own (see kv_cache.empty_cache)."""
    from graphpatch_cache import ExampleSignature, build

    model, _, _ = _t5()
    store = CacheStore(tmp_path / "store", local_dir=tmp_path / "local")
    build(model.config, model_class=T.T5ForConditionalGeneration, store=store,
          signature=ExampleSignature(batch_size=2, seq_len=3, use_cache=True))
    ids, dec = torch.randint(2, 128, (2, 3)), torch.randint(2, 128, (2, 3))
    pg = load_cached(model, store=store, input_ids=ids, decoder_input_ids=dec, use_cache=True)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    ours, theirs = pg(input_ids=ids, decoder_input_ids=dec, use_cache=True), model(input_ids=ids, decoder_input_ids=dec,
                                                                                  use_cache=True)
    assert torch.equal(ours.logits, theirs.logits) and ours.cache.is_updated == {0: True, 1: True}
    for part in ("self_attention_cache", "cross_attention_cache"):
        for a, b in zip(getattr(ours.cache, part).layers, getattr(theirs.cache, part).layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
