"""Shared tiny-model fixtures. Every model has random weights from a fixed seed."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_dirs(tmp_path_factory):
    """No test touches the user's real cache: the default roots point into a temp dir."""
    base = tmp_path_factory.mktemp("default-cache")
    old = {k: os.environ.get(k) for k in ("GRAPHPATCH_CACHE_DIR", "GRAPHPATCH_CACHE_LOCAL_DIR")}
    os.environ["GRAPHPATCH_CACHE_DIR"] = str(base / "root")
    os.environ["GRAPHPATCH_CACHE_LOCAL_DIR"] = str(base / "local")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


def token_inputs(batch: int = 2, seq: int = 8, vocab: int = 128, seed: int = 1, mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g), "use_cache": False}
    if mask:
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return inputs


@pytest.fixture(scope="session")
def gpt2_18():
    """GPT-2 with 18 layers (so the seed path transformer.h_17 exists), and its PatchableGraph."""
    from graphpatch_cache import PatchableGraph

    model = tiny_gpt2(n_layer=18)
    inputs = token_inputs()
    return model, inputs, PatchableGraph(model, **inputs)


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


_REFUSED_MARKERS = ("not on the allowlist", "graphs may not read", "not an allowed torch.Tensor method")


@pytest.fixture(autouse=True)
def _allowlist_not_too_tight(request, monkeypatch):
    """Every graph the suite extracts, from every model family, must compile under the closed
    allowlist: a module left opaque because the list refused one of its ops fails the test
    that extracted it (tests that build such a graph on purpose say so with
    ``@pytest.mark.allowlist_refusal``). Extraction itself already runs the loader's checks on
    what it produces, so an artifact the loader would refuse never leaves extraction."""
    import graphpatch_cache.extraction as extraction

    if request.node.get_closest_marker("allowlist_refusal"):
        yield
        return
    original = extraction.extract
    refused = []

    def extract(*args, **kwargs):
        artifact = original(*args, **kwargs)
        refused.extend(f"{path}: {why}" for path, why in artifact.extraction.get("opaque", {}).items()
                       if any(m in why for m in _REFUSED_MARKERS))
        return artifact

    monkeypatch.setattr(extraction, "extract", extract)
    yield
    assert not refused, f"the closed allowlist refused ops of a test model (review and add them): {refused}"


def pytest_configure(config):
    config.addinivalue_line("markers", "allowlist_refusal: the test extracts a graph the allowlist refuses on purpose")
