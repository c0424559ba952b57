"""Tiny model factories and inputs shared by the tests (random weights from a fixed seed).

Plain functions, imported as ``from tiny_models import tiny_gpt2, token_inputs``: ``tests/helpers`` is
put on ``sys.path`` by ``tests/conftest.py``."""

from __future__ import annotations

import torch


def tiny_gpt2(n_layer: int = 2, attn: str = "sdpa", seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    return GPT2LMHeadModel(config).eval()


def tiny_llama(attn: str = "sdpa", seed: int = 0, n_layer: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def tiny_xglm(n_layer: int = 2, seed: int = 0):
    """A causal LM whose positional embedding takes the cache length as a Python int (as
    BART's, Whisper's and others' do); no end-of-sequence token, so generation runs its length."""
    from transformers import XGLMConfig, XGLMForCausalLM

    torch.manual_seed(seed)
    config = XGLMConfig(vocab_size=128, d_model=32, num_layers=n_layer, attention_heads=2, ffn_dim=64,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=None, pad_token_id=1)
    config._attn_implementation = "eager"  # (XGLM has no sdpa path)
    return XGLMForCausalLM(config).eval()


def tiny_mlp(seed: int = 0):
    """A plain two-layer MLP (no transformers): the cheapest model to extract, for tests that
    start many processes (``tests/integration/test_cache_s3.py``)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


def mlp_inputs(batch: int = 2, seed: int = 1):
    """``{"input": x}``: the keyword ``nn.Sequential.forward`` names its argument."""
    return {"input": torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))}


def token_inputs(batch: int = 2, seq: int = 8, vocab: int = 128, seed: int = 1, mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g), "use_cache": False}
    if mask:
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return inputs


def generate_with_a_banned_token(pg, model, ids, mask, banned, *, use_cache, max_new_tokens=6):
    """``(through pg with a patch setting logit `banned` to -inf, the model's own generate
    with a logits processor doing the same)``, both greedy."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from graphpatch_cache import CustomPatch

    def ban(logits):
        logits = logits.clone()
        logits[..., banned] = float("-inf")
        return logits

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return ban(scores)

    with pg.patch({"output|logits": CustomPatch(custom_op=ban)}):
        patched = pg.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, use_cache=use_cache)
    oracle = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            use_cache=use_cache, logits_processor=LogitsProcessorList([Ban()]))
    return patched, oracle


class WritesInPlace(torch.nn.Module):
    """A graph that writes in place into a value it made, after the value is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        a = self.lin(x)
        b = a.clone()
        b.mul_(2.0)  # a write after the value of `b` is recorded
        return b + 1


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def tiny_moe(family: str, experts: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 2-layer Mixture-of-Experts model (4 experts, 2 per token), every parameter drawn from
    N(0, 0.5) (some families' routers start at zero: ties would route arbitrarily).
    ``experts`` is transformers' ``experts_implementation`` (None: its default)."""
    import transformers as T

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_experts_per_tok=2)
    if family == "mixtral":
        cls, config = T.MixtralForCausalLM, T.MixtralConfig(intermediate_size=64, num_local_experts=4, **common)
    elif family == "qwen2_moe":
        cls, config = T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, **common)
    elif family == "qwen3_moe":
        cls, config = T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, num_experts=4, head_dim=8, **common)
    elif family == "deepseek_v3":  # layer 0 dense, layer 1 MoE (with a shared expert and grouped routing)
        cls, config = T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_group=2, topk_group=1,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, n_shared_experts=1, **common)
    else:
        raise ValueError(family)
    if experts is not None:
        config._experts_implementation = experts
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)
    return model.to(dtype)


def moe_layer(family: str) -> int:
    """The first layer of ``tiny_moe(family)`` with experts."""
    return 1 if family == "deepseek_v3" else 0
