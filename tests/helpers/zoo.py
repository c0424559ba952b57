"""The model zoo: one tiny config per architecture (2 layers, small widths, vocab 128), shared by
``tests/integration/test_zoo.py`` and ``scripts/model_zoo.py``.

Each :class:`Arch` says how to build its model for an attention implementation, what example
inputs it takes, and which MLP value of its middle layer the probe and zero checks patch: the
input of the MLP's last linear (or another module), by the graph's node path and by the module
path a forward pre-hook on the plain model uses as the oracle. Random weights from a fixed seed;
nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Tuple

import torch

VOCAB = 128
BATCH, SEQ = 2, 8

#: keyword arguments most decoder-only configs share (Llama's names)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                bos_token_id=0, eos_token_id=0, pad_token_id=0)


@dataclass(frozen=True)
class Arch:
    """One architecture of the zoo.

    ``kind``: "causal" (a causal LM: extracted with ``use_cache=True``, generates), "encoder",
    "seq2seq" or "vision". ``module``: the dotted path of the module whose first input is the
    patched MLP value (the oracle hooks it); ``node``: the same value's node path in the graph.
    ``inputs``: the example-input builder's name (see :func:`example_inputs`).
    """

    name: str
    kind: str
    model_class: str
    config_class: str
    config: Dict[str, Any]
    module: str
    node: str
    inputs: str = "tokens"
    notes: str = ""
    attns: Tuple[str, ...] = field(default=())

    def model_cls(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)

    def attentions(self) -> Tuple[str, ...]:
        """Both eager and sdpa for a causal LM that has both; otherwise the default one."""
        if self.attns:
            return self.attns
        sdpa = bool(getattr(self.model_cls(), "_supports_sdpa", False))
        if self.kind == "causal" and sdpa:
            return ("eager", "sdpa")
        return ("sdpa",) if sdpa else ("eager",)

    def build(self, attn: str) -> torch.nn.Module:
        import transformers

        config = getattr(transformers, self.config_class)(**self.config)
        torch.manual_seed(0)
        return self.model_cls()._from_config(config, attn_implementation=attn).eval()


def _causal(name: str, model_class: str, config_class: str, module: str = "model.layers.1.mlp.down_proj",
            node: str = "", **config: Any) -> Arch:
    node = node or _node_of(module)
    return Arch(name, "causal", model_class, config_class, {**_DECODER, **config}, module, node)


def _node_of(module: str) -> str:
    """``model.layers.1.mlp.down_proj`` -> ``model.layers_1.mlp.down_proj.input`` (a Linear's
    argument): a numbered child is named ``layers_1`` in node paths, and a child named like a
    name graphs use themselves (BERT's ``output``) gets a trailing ``_``."""
    parts: List[str] = []
    for part in module.split("."):
        if part.isdigit():
            parts[-1] += "_" + part
        else:
            parts.append(part + "_" if part in ("output", "self") else part)
    return ".".join(parts) + ".input"


def _own(name: str, kind: str, model_class: str, config_class: str, module: str, inputs: str = "tokens",
         node: str = "", **config: Any) -> Arch:
    return Arch(name, kind, model_class, config_class, config, module, node or _node_of(module), inputs)


_HEAD8 = dict(head_dim=8)

ARCHS: Tuple[Arch, ...] = (
    _own("gpt2", "causal", "GPT2LMHeadModel", "GPT2Config", "transformer.h.1.mlp.c_proj",
         node="transformer.h_1.mlp.c_proj.x", n_layer=2, n_embd=32,
         n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
    _causal("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", "gpt_neox.layers.1.mlp.dense_4h_to_h"),
    _own("gptj", "causal", "GPTJForCausalLM", "GPTJConfig", "transformer.h.1.mlp.fc_out", n_layer=2, n_embd=32,
         n_head=4, rotary_dim=4, n_inner=64, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
    _own("gpt_bigcode", "causal", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", "transformer.h.1.mlp.c_proj",
         n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
         eos_token_id=0),
    _causal("llama", "LlamaForCausalLM", "LlamaConfig"),
    # sliding windows shorter than the prompts (4 < 5, 8): a prompt shorter than its window gets
    # a graph of its own sizes (kv_sliding.skipped_window_mask), which the "exact at another shape"
    # check would report; Mistral's default window (4096) is one such case
    _causal("mistral", "MistralForCausalLM", "MistralConfig", sliding_window=4, **_HEAD8),
    _causal("mixtral", "MixtralForCausalLM", "MixtralConfig", "model.layers.1.mlp.experts",
            node="model.layers_1.mlp.experts.hidden_states", num_local_experts=4, num_experts_per_tok=2),
    _causal("qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
    _causal("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", "model.layers.1.mlp.shared_expert.down_proj",
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32),
    _causal("qwen3", "Qwen3ForCausalLM", "Qwen3Config", **_HEAD8),
    _causal("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "model.layers.1.mlp.experts",
            node="model.layers_1.mlp.experts.hidden_states", num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, **_HEAD8),
    _causal("gemma", "GemmaForCausalLM", "GemmaConfig", **_HEAD8),
    _causal("gemma2", "Gemma2ForCausalLM", "Gemma2Config", sliding_window=4, **_HEAD8),
    _causal("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig", sliding_window=4, **_HEAD8),
    _causal("phi", "PhiForCausalLM", "PhiConfig", "model.layers.1.mlp.fc2"),
    _causal("phi3", "Phi3ForCausalLM", "Phi3Config"),
    _own("falcon", "causal", "FalconForCausalLM", "FalconConfig", "transformer.h.1.mlp.dense_4h_to_h",
         hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, bos_token_id=0,
         eos_token_id=0),
    _own("bloom", "causal", "BloomForCausalLM", "BloomConfig", "transformer.h.1.mlp.dense_4h_to_h", hidden_size=32,
         n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    # OPTForCausalLM calls self.model.decoder directly: its graph is named after that path
    _own("opt", "causal", "OPTForCausalLM", "OPTConfig", "model.decoder.layers.1.fc2",
         node="model_decoder.layers_1.fc2.input", hidden_size=32, ffn_dim=64,
         num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, vocab_size=VOCAB,
         max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1),
    _causal("olmo", "OlmoForCausalLM", "OlmoConfig"),
    _causal("olmo2", "Olmo2ForCausalLM", "Olmo2Config"),
    _causal("stablelm", "StableLmForCausalLM", "StableLmConfig"),
    _causal("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", "model.layers.1.mlp.c_proj"),
    _causal("cohere", "CohereForCausalLM", "CohereConfig"),
    _causal("granite", "GraniteForCausalLM", "GraniteConfig"),
    _causal("deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3Config", "model.layers.1.mlp.shared_experts.down_proj",
            num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            v_head_dim=8, qk_nope_head_dim=8, n_shared_experts=1),
    _causal("glm4", "Glm4ForCausalLM", "Glm4Config", **_HEAD8),
    _own("bert", "encoder", "BertModel", "BertConfig", "encoder.layer.1.output.dense", hidden_size=32,
         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
         max_position_embeddings=64, pad_token_id=0),
    _own("roberta", "encoder", "RobertaModel", "RobertaConfig", "encoder.layer.1.output.dense", hidden_size=32,
         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
         max_position_embeddings=64, pad_token_id=1),
    _own("distilbert", "encoder", "DistilBertModel", "DistilBertConfig", "transformer.layer.1.ffn.lin2", dim=32,
         hidden_dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0),
    # ALBERT calls its one layer group twice: the second call is the middle layer's
    _own("albert", "encoder", "AlbertModel", "AlbertConfig", "encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
         node="encoder.albert_layer_groups_0_1.albert_layers_0.ffn_output.input", embedding_size=16, hidden_size=32,
         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
         max_position_embeddings=64, pad_token_id=0),
    _own("electra", "encoder", "ElectraModel", "ElectraConfig", "encoder.layer.1.output.dense", embedding_size=32,
         hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
         max_position_embeddings=64, pad_token_id=0),
    # relative attention as DeBERTa-v3 uses it (it reads encoder.rel_embeddings.weight directly)
    _own("deberta_v2", "encoder", "DebertaV2Model", "DebertaV2Config", "encoder.layer.1.output.dense",
         relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
         norm_rel_ebd="layer_norm", share_att_key=True, hidden_size=32,
         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
         max_position_embeddings=64, pad_token_id=0),
    _own("t5", "seq2seq", "T5ForConditionalGeneration", "T5Config", "decoder.block.1.layer.2.DenseReluDense.wo",
         d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    _own("bart", "seq2seq", "BartForConditionalGeneration", "BartConfig", "model.decoder.layers.1.fc2", d_model=32,
         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
         encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64),
    _own("mbart", "seq2seq", "MBartForConditionalGeneration", "MBartConfig", "model.decoder.layers.1.fc2", d_model=32,
         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
         encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64),
    _own("whisper", "seq2seq", "WhisperForConditionalGeneration", "WhisperConfig", "model.decoder.layers.1.fc2",
         inputs="audio", d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, num_mel_bins=16,
         max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
         decoder_start_token_id=0),
    _own("vit", "vision", "ViTModel", "ViTConfig", "layers.1.mlp.fc2", inputs="pixels", hidden_size=32,
         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    _own("clip_text", "encoder", "CLIPTextModel", "CLIPTextConfig", "encoder.layers.1.mlp.fc2",
         hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
         max_position_embeddings=64, projection_dim=32, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    _own("clip_vision", "vision", "CLIPVisionModel", "CLIPVisionConfig", "encoder.layers.1.mlp.fc2",
         inputs="pixels", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         image_size=32, patch_size=8, projection_dim=32),
)

BY_NAME: Dict[str, Arch] = {arch.name: arch for arch in ARCHS}


def cases() -> List[Tuple[str, str]]:
    """Every (architecture, attention implementation) the zoo checks (``scripts/model_zoo.py``,
    which writes docs/models.md, runs them all)."""
    return [(arch.name, attn) for arch in ARCHS for attn in arch.attentions()]


#: causal LMs whose eager attention is their own code: every other family's
#: ``eager_attention_forward`` is Llama's, node for node (compared as syntax trees with
#: transformers 5.24), and all but Falcon run sdpa through transformers' one shared
#: ``sdpa_attention_forward``. The suite checks eager only for these.
EAGER_IN_SUITE = frozenset({"llama", "gpt2", "gpt_neox", "gptj", "opt", "gpt_bigcode", "gemma3_text", "falcon"})


def suite_cases() -> List[Tuple[str, str]]:
    """The cases the test suite runs: every architecture with its default attention (sdpa where
    it has it, as ``from_pretrained`` picks), plus eager where eager is the family's own code.
    About 200 s of CPU less than :func:`cases` on 2 cores."""
    return [(name, attn) for name, attn in cases()
            if attn != "eager" or name in EAGER_IN_SUITE or len(BY_NAME[name].attentions()) == 1]


def example_inputs(arch: Arch, batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> Dict[str, Any]:
    """The example call: tokens with an all-ones mask (``use_cache=True`` for a causal LM, so
    the extracted graph is the one ``generate``'s prompt step calls; ``False`` for encoder-decoders,
    whose generation is not checked here), pixels or audio features."""
    g = torch.Generator().manual_seed(seed)
    if arch.inputs == "pixels":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if arch.inputs == "audio":
        features = torch.randn(batch, arch.config["num_mel_bins"], 2 * arch.config["max_source_positions"],
                               generator=g)
        return {"input_features": features, "decoder_input_ids": torch.randint(3, VOCAB, (batch, seq + 1),
                                                                               generator=g), "use_cache": False}
    inputs: Dict[str, Any] = {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g),
                              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if arch.kind == "causal":
        inputs["use_cache"] = True
    if arch.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq + 1), generator=g)
        inputs["use_cache"] = False
    return inputs


def tensor_leaves(value: Any, path: str = "output") -> Iterator[Tuple[str, Any]]:
    """Every leaf of a model's output as ``(path, value)``: tensors of model outputs, tuples and
    dicts, and the keys and values of each layer of a transformers key/value cache. Leaves of
    another kind are yielded as they are (compared with ``==``)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, float, bool, str)):
        yield path, value
    elif isinstance(value, dict):  # ModelOutput is an OrderedDict of its set fields
        for key, item in value.items():
            yield from tensor_leaves(item, f"{path}.{key}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from tensor_leaves(item, f"{path}[{i}]")
    elif hasattr(value, "self_attention_cache"):  # EncoderDecoderCache
        yield from tensor_leaves(value.self_attention_cache, f"{path}.self_attention_cache")
        yield from tensor_leaves(value.cross_attention_cache, f"{path}.cross_attention_cache")
    elif hasattr(value, "layers"):  # a transformers Cache
        yield path + ".type", type(value).__name__
        for i, layer in enumerate(value.layers):
            yield path + f".layers[{i}].type", type(layer).__name__
            yield from tensor_leaves([getattr(layer, "keys", None), getattr(layer, "values", None)],
                                     f"{path}.layers[{i}]")
    else:
        raise TypeError(f"{path}: a {type(value).__name__} the zoo cannot compare leaf by leaf")


def differences(got: Any, expected: Any) -> List[str]:
    """The leaf paths where ``got`` and ``expected`` differ (``torch.equal`` for tensors); empty
    when every leaf is the same."""
    mine, theirs = dict(tensor_leaves(got)), dict(tensor_leaves(expected))
    found = [f"{p}: missing" for p in theirs if p not in mine] + [f"{p}: extra" for p in mine if p not in theirs]
    for p, want in theirs.items():
        have = mine.get(p)
        if p not in mine:
            continue
        if isinstance(want, torch.Tensor):
            same = isinstance(have, torch.Tensor) and have.shape == want.shape and torch.equal(have, want)
        else:
            same = have == want
        if not same:
            found.append(f"{p}: differs")
    return found


__all__ = ["ARCHS", "Arch", "BY_NAME", "EAGER_IN_SUITE", "cases", "suite_cases", "differences", "example_inputs", "tensor_leaves"]
