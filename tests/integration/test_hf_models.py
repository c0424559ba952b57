"""Tiny Hugging Face models (GPT-2, Llama, Mistral, Qwen2, BERT, T5), sdpa and eager attention.

For every model and attention implementation:

- extraction compiles everything (no opaque fallback);
- outputs are bit-identical to the original model, on the example inputs and on other batch
  sizes / sequence lengths, with and without ``attention_mask``;
- a patch on layer 0's MLP output equals the same change made by a forward hook on the
  original module;
- with eager attention the softmax is a patchable node whose value equals
  ``output_attentions=True``; with sdpa it stays inside ``scaled_dot_product_attention``;
- gradients through the graphs equal the original model's.

Every model is built from a tiny config with random weights (seeded); nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from graphpatch_cache import AddPatch, ExtractionOptions, PatchableGraph, ProbePatch, ZeroPatch

pytestmark = pytest.mark.slow  # extracts transformers model families

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

VOCAB = 128
HIDDEN = 32
ATTNS = ("sdpa", "eager")


# ------------------------------------------------------------------------------------------------
# Model specs
# ------------------------------------------------------------------------------------------------


def _decoder_only_config(config_cls, **extra):
    return config_cls(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)


def _config(name: str):
    T = transformers
    if name == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=2, vocab_size=VOCAB, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)
    if name == "llama":
        return T.LlamaForCausalLM, _decoder_only_config(T.LlamaConfig)
    if name == "mistral":
        return T.MistralForCausalLM, _decoder_only_config(T.MistralConfig, sliding_window=None)
    if name == "qwen2":
        return T.Qwen2ForCausalLM, _decoder_only_config(T.Qwen2Config)
    if name == "bert":
        return T.BertModel, T.BertConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                         pad_token_id=0)
    if name == "t5":
        return T.T5ForConditionalGeneration, T.T5Config(d_model=HIDDEN, d_ff=64, d_kv=16, num_layers=2,
                                                        num_decoder_layers=2, num_heads=2, vocab_size=VOCAB,
                                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    raise ValueError(name)


def build_model(name: str, attn: str) -> torch.nn.Module:
    model_cls, config = _config(name)
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    return model


def make_inputs(name: str, batch: int = 2, seq: int = 8, mask: Optional[str] = None, seed: int = 1) -> dict:
    """``mask``: None (no attention_mask), "ones", or "padded" (right padding in row 0, so
    every query row still sees at least one key and no softmax row is fully masked)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g)}
    if name == "t5":
        # decoder length seq + 1, so encoder and decoder lengths differ (equal sizes are
        # covered by the square-input tests at the end)
        inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, seq + 1), generator=g)
    if name != "bert":
        inputs["use_cache"] = False
    if mask is not None:
        attention_mask = torch.ones(batch, seq, dtype=torch.long)
        if mask == "padded":
            attention_mask[0, -2:] = 0
        inputs["attention_mask"] = attention_mask
    return inputs


@dataclass(frozen=True)
class Spec:
    out_key: str
    #: node path of an MLP's output in layer 0, and the original module it comes from
    mlp_path: str
    mlp_module: Callable[[torch.nn.Module], torch.nn.Module]
    #: attention-module graph path -> (eager softmax node name, getter of the same
    #: probabilities from the original model's ``output_attentions=True`` output)
    attention: Dict[str, Tuple[str, Callable[[object], torch.Tensor]]]


_DECODER_ONLY = dict(
    out_key="logits",
    mlp_path="model.layers_0.mlp.output",
    mlp_module=lambda m: m.model.layers[0].mlp,
    attention={"model.layers_0.self_attn": ("softmax", lambda out: out.attentions[0]),
               "model.layers_1.self_attn": ("softmax", lambda out: out.attentions[1])},
)

SPECS = {
    "gpt2": Spec(
        out_key="logits",
        mlp_path="transformer.h_0.mlp.output",
        mlp_module=lambda m: m.transformer.h[0].mlp,
        attention={"transformer.h_0.attn": ("attn_weights_2", lambda out: out.attentions[0]),
                   "transformer.h_1.attn": ("attn_weights_2", lambda out: out.attentions[1])},
    ),
    "llama": Spec(**_DECODER_ONLY),
    "mistral": Spec(**_DECODER_ONLY),
    "qwen2": Spec(**_DECODER_ONLY),
    "bert": Spec(
        out_key="last_hidden_state",
        mlp_path="encoder.layer_0.intermediate.output",
        mlp_module=lambda m: m.encoder.layer[0].intermediate,
        attention={"encoder.layer_0.attention.self_": ("attn_weights_1", lambda out: out.attentions[0]),
                   "encoder.layer_1.attention.self_": ("attn_weights_1", lambda out: out.attentions[1])},
    ),
    "t5": Spec(
        out_key="logits",
        # the encoder's MLP: its change reaches the logits through cross-attention
        mlp_path="encoder.block_0.layer_1.DenseReluDense.output",
        mlp_module=lambda m: m.encoder.block[0].layer[1].DenseReluDense,
        attention={
            "encoder.block_0.layer_0.SelfAttention": ("attn_weights_2", lambda out: out.encoder_attentions[0]),
            "decoder.block_0.layer_0.SelfAttention": ("attn_weights_3", lambda out: out.decoder_attentions[0]),
            "decoder.block_1.layer_1.EncDecAttention": ("attn_weights_2", lambda out: out.cross_attentions[1]),
        },
    ),
}

MODELS = tuple(SPECS)


def extraction_options(name: str) -> ExtractionOptions:
    # T5's ``shared`` embedding is never called itself: the encoder's and decoder's
    # ``embed_tokens`` (other modules) hold its tied weight. See test_t5_default_options.
    return ExtractionOptions()


@dataclass
class Case:
    name: str
    attn: str
    spec: Spec
    model: torch.nn.Module
    inputs: dict
    pg: PatchableGraph


CONFIGS = [(n, a) for n in MODELS for a in ATTNS]


def _ids(config) -> str:
    return f"{config[0]}-{config[1]}"


@pytest.fixture(scope="module")
def built() -> Dict[Tuple[str, str], Case]:
    """Model and PatchableGraph per (model, attention), built once on first use: each
    extraction costs seconds, so every test of the module shares them."""
    return {}


@pytest.fixture
def case(request, built) -> Case:
    name, attn = request.param
    if (name, attn) not in built:
        model = build_model(name, attn)
        inputs = make_inputs(name)
        pg = PatchableGraph(model, extraction_options(name), **inputs)
        built[name, attn] = Case(name, attn, SPECS[name], model, inputs, pg)
    return built[name, attn]


def on_configs(configs):
    return pytest.mark.parametrize("case", configs, indirect=True, ids=_ids)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def module_graph(artifact, path: str):
    """The ModuleGraph at a node path (local names joined by dots)."""
    graph = artifact.root
    for part in path.split("."):
        graph = next(c for c in graph.children if c.name == part)
    return graph


def node_data(artifact, path: str):
    graph_path, _, name = path.rpartition(".")
    return next(n for n in module_graph(artifact, graph_path).nodes if n.name == name)


def assert_fully_compiled(pg: PatchableGraph) -> None:
    for artifact in pg.variants:
        assert artifact.extraction["opaque"] == {}
        opaque = [g.module_path for g in artifact.root.walk() if g.kind == "opaque"]
        assert opaque == [], f"opaque modules: {opaque}"


def out_of(case: Case, output) -> torch.Tensor:
    return output[case.spec.out_key]


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@on_configs(CONFIGS)
def test_fully_compiled(case: Case):
    assert_fully_compiled(case.pg)
    assert case.pg.artifact.root.kind == "compiled"
    assert sum(1 for _ in case.pg.artifact.root.walk()) > 10


@on_configs(CONFIGS)
def test_exact_outputs_on_example(case: Case):
    with torch.no_grad():
        expected = out_of(case, case.model(**case.inputs))
        got = out_of(case, case.pg(**case.inputs))
    assert torch.equal(got, expected)


@on_configs(CONFIGS)
@pytest.mark.parametrize("mask", [None, "ones", "padded"], ids=lambda m: f"mask-{m}")
def test_exact_outputs_other_shapes(case: Case, mask):
    """(3, 5): graphs traced at (2, 8) run other sizes; with a mask, a second graph variant."""
    _check_shape(case, 3, 5, mask)


@on_configs(CONFIGS)
def test_exact_outputs_batch_one(case: Case):
    """Batch size 1 (served by the example's graphs where the model's code does not branch on
    it, see test_size_one.py; else by graphs of its own), sequence 11:
    without a mask for sdpa, with a padded one for eager (one extraction per config keeps the
    file fast; the (3, 5) test covers every mask state on the shared graphs)."""
    _check_shape(case, 1, 11, None if case.attn == "sdpa" else "padded")


def _check_shape(case: Case, batch: int, seq: int, mask) -> None:
    inputs = make_inputs(case.name, batch, seq, mask=mask, seed=seq)
    with torch.no_grad():
        expected = out_of(case, case.model(**inputs))
        got = out_of(case, case.pg(**inputs))
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert_fully_compiled(case.pg)


@on_configs(CONFIGS)
def test_other_shapes_reuse_graphs(case: Case):
    """Other sequence lengths and batch sizes (other than 1) reuse the example's graphs."""
    before = len(case.pg.variants)
    with torch.no_grad():
        for batch, seq in [(3, 5), (4, 13)]:
            inputs = make_inputs(case.name, batch, seq, seed=batch)
            assert torch.equal(out_of(case, case.pg(**inputs)), out_of(case, case.model(**inputs)))
    assert len(case.pg.variants) == before


@on_configs(CONFIGS)
def test_mlp_patch_matches_forward_hook(case: Case):
    """Probe, add a vector and zero position 1 of layer 0's MLP output; the oracle makes the
    same change with a forward hook on the original module."""
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(HIDDEN if case.name != "bert" else 64, generator=g)
    inputs = make_inputs(case.name, 3, 6, mask="padded", seed=3)

    def change(out: torch.Tensor) -> torch.Tensor:
        out = out + delta  # AddPatch
        out = out.clone()  # ZeroPatch(slice=...) writes into a clone
        out[:, 1] = torch.zeros_like(out[:, 1])
        return out

    seen: List[torch.Tensor] = []

    def hook(module, args, output):
        seen.append(output.detach().clone())
        return change(output)

    with torch.no_grad():
        unpatched = out_of(case, case.model(**inputs))
        handle = case.spec.mlp_module(case.model).register_forward_hook(hook)
        try:
            expected = out_of(case, case.model(**inputs))
        finally:
            handle.remove()
        probe = ProbePatch()
        with case.pg.patch({case.spec.mlp_path: [probe, AddPatch(value=delta), ZeroPatch(slice=(slice(None), 1))]}):
            got = out_of(case, case.pg(**inputs))
        after = out_of(case, case.pg(**inputs))

    assert len(seen) == 1
    assert torch.equal(probe.activation, seen[0])
    assert not torch.equal(expected, unpatched)  # the change does reach the output
    assert torch.equal(got, expected)
    assert torch.equal(after, unpatched)  # leaving the context removes the patch


def _softmax_paths(case: Case) -> Dict[str, Callable[[object], torch.Tensor]]:
    return {f"{graph_path}.{node}": getter for graph_path, (node, getter) in case.spec.attention.items()}


def _check_probabilities(case: Case, inputs: dict) -> None:
    """Probe every listed softmax node: the values sum to 1 and equal the original model's
    ``output_attentions=True``; the output is unchanged by the probes."""
    paths = _softmax_paths(case)
    probes = {path: ProbePatch() for path in paths}
    with torch.no_grad():
        with case.pg.patch(probes):
            got = out_of(case, case.pg(**inputs))
        reference = case.model(**inputs, output_attentions=True)
    assert torch.equal(got, out_of(case, reference))
    for path, getter in paths.items():
        probs = probes[path].activation
        assert probs is not None, path
        # a float32 sum of at most 13 terms: only rounding separates it from 1
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-6, rtol=0)
        assert torch.equal(probs, getter(reference)), path


@on_configs(CONFIGS)
def test_attention_probabilities(case: Case, monkeypatch):
    """eager: the softmax is a patchable node equal to ``output_attentions=True``, and
    patching it equals the same change made to the original model's softmax; sdpa: the
    probabilities stay inside one scaled_dot_product_attention node."""
    artifact = case.pg.artifact
    if case.attn == "sdpa":
        for graph_path in case.spec.attention:
            targets = [n.target for n in module_graph(artifact, graph_path).nodes]
            assert "torch.nn.functional.scaled_dot_product_attention" in targets
            assert not any("softmax" in t for t in targets)
        return

    paths = _softmax_paths(case)
    for path in paths:
        assert node_data(artifact, path).target == "torch.nn.functional.softmax", path
    inputs = make_inputs(case.name, 2, 7, seed=5)  # the example's argument set: same graphs
    _check_probabilities(case, inputs)

    # Zero head 0's probabilities in the first attention module (the first softmax the
    # model calls). Oracle: the original model with nn.functional.softmax wrapped so that its
    # first call does the same (these models call it as ``nn.functional.softmax(...)``).
    first = next(iter(paths))
    softmax = torch.nn.functional.softmax
    calls = []

    def zero_first_head(*args, **kwargs):
        out = softmax(*args, **kwargs)
        calls.append(out.shape)
        if len(calls) == 1:
            out = out.clone()
            out[:, 0] = torch.zeros_like(out[:, 0])
        return out

    with torch.no_grad():
        base = out_of(case, case.model(**inputs))
        with monkeypatch.context() as mp:
            mp.setattr(torch.nn.functional, "softmax", zero_first_head)
            expected = out_of(case, case.model(**inputs))
        with case.pg.patch({first: ZeroPatch(slice=(slice(None), 0))}):
            patched = out_of(case, case.pg(**inputs))
    assert calls and calls[0][-1] == inputs["input_ids"].shape[-1]
    assert not torch.equal(expected, base)
    assert torch.equal(patched, expected)




@pytest.mark.parametrize(
    "case",
    [c for c in CONFIGS if c[1] == "eager"],
    indirect=True,
    ids=_ids,
)
def test_attention_probabilities_with_mask(case: Case):
    """The softmax paths shown by pg.graph (the example, without a mask) still name the
    softmax when the call has a padded attention_mask (another graph variant)."""
    _check_probabilities(case, make_inputs(case.name, 2, 7, mask="padded", seed=5))


@on_configs(CONFIGS)
def test_gradients_match(case: Case):
    inputs = make_inputs(case.name, 2, 6, mask="padded", seed=2)
    params = dict(case.model.named_parameters())

    def grads(run) -> Dict[str, Optional[torch.Tensor]]:
        case.model.zero_grad(set_to_none=True)
        out = run(**inputs)
        loss = out_of(case, out).sum()
        if case.name == "bert":
            loss = loss + out["pooler_output"].sum()
        loss.backward()
        result = {n: (p.grad.clone() if p.grad is not None else None) for n, p in params.items()}
        case.model.zero_grad(set_to_none=True)
        return result

    expected = grads(case.model)
    got = grads(case.pg)
    assert expected.keys() == got.keys()
    assert any(g is not None for g in expected.values())
    for name in expected:
        if expected[name] is None:
            assert got[name] is None, name
            continue
        assert got[name] is not None, name
        assert torch.equal(got[name], expected[name]), name


def test_t5_default_options():
    """T5 extracts with default options (``shared`` owns no parameter of its own). The
    encoder-only T5 has the same ``shared``/``embed_tokens`` tying and extracts faster."""
    _, config = _config("t5")
    torch.manual_seed(0)
    model = transformers.T5EncoderModel._from_config(config, attn_implementation="sdpa").eval()
    assert model.shared.weight is model.encoder.embed_tokens.weight
    inputs = {"input_ids": make_inputs("t5")["input_ids"]}
    pg = PatchableGraph(model, **inputs)
    assert torch.equal(pg(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_square_example_inputs_extract():
    model = build_model("llama", "sdpa")
    inputs = make_inputs("llama", 3, 3)
    pg = PatchableGraph(model, **inputs)
    assert torch.equal(pg(**inputs).logits, model(**inputs).logits)


def test_square_example_inputs_then_other_shape():
    model = build_model("bert", "eager")
    pg = PatchableGraph(model, **make_inputs("bert", 3, 3))
    inputs = make_inputs("bert", 3, 5)
    with torch.no_grad():
        assert torch.equal(pg(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
