"""Cache keys without extraction: everything that determines the graphs changes the key; nothing
else does (``cache_key`` on tiny models; the cache hits, the stale-source checks and a second
process are in tests/integration/test_cache_keys.py).

Different key: number of layers, dtype, extraction options, the source of a model class,
torch/transformers versions, sdpa vs eager attention, tied vs untied weights.

Same key: another ``config._name_or_path``, another working directory, other parameter values,
another batch size or sequence length (both >= 2), the same model saved to and loaded from two
directories."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from graphpatch_cache import ExtractionOptions, cache_key
from graphpatch_cache.cache.keys import environment_fingerprint, key_material

from tiny_models import tiny_gpt2, tiny_llama, token_inputs


def _key(model, **inputs):
    return cache_key(model, **(inputs or token_inputs()))


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def base_key(gpt2):
    return _key(gpt2)


# ------------------------------------------------------------------------------------------------
# Different key
# ------------------------------------------------------------------------------------------------


def test_n_layer_changes_key(base_key):
    assert _key(tiny_gpt2(n_layer=3)) != base_key
    assert _key(tiny_llama(n_layer=2)) != _key(tiny_llama(n_layer=3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_changes_key(base_key, dtype):
    assert _key(tiny_gpt2().to(dtype)) != base_key


def test_extraction_options_change_key(gpt2, base_key):
    inputs = token_inputs()
    assert cache_key(gpt2, options=ExtractionOptions(), **inputs) == base_key  # default options
    keys = {
        cache_key(gpt2, options=opts, **inputs)
        for opts in (
            ExtractionOptions(allow_unused_submodules=False),  # the default is True (graphpatch's)
            ExtractionOptions(skip_compilation=True),
            ExtractionOptions(classes_to_skip_compiling=(torch.nn.LayerNorm,)),
        )
    }
    assert len(keys) == 3 and base_key not in keys


def test_environment_versions_change_key(gpt2, base_key):
    inputs = token_inputs()
    env = environment_fingerprint(gpt2)
    assert cache_key(gpt2, environment=dict(env), **inputs) == base_key
    assert cache_key(gpt2, environment={**env, "torch": env["torch"] + ".other"}, **inputs) != base_key
    assert cache_key(gpt2, environment={**env, "transformers": "0.0.1"}, **inputs) != base_key


def test_attention_implementation_changes_key():
    assert _key(tiny_gpt2(attn="sdpa")) != _key(tiny_gpt2(attn="eager"))
    assert _key(tiny_llama(attn="sdpa")) != _key(tiny_llama(attn="eager"))


def test_experts_implementation_changes_key():
    """A private config field (``to_dict`` leaves it out) that decides a MoE layer's graph;
    models without experts ("eager") keep the key they had."""
    from tiny_models import tiny_moe

    keys = {impl: _key(tiny_moe("mixtral", experts=impl)) for impl in (None, "grouped_mm", "batched_mm", "eager")}
    assert keys[None] == keys["grouped_mm"]  # transformers' default
    assert len({keys["grouped_mm"], keys["batched_mm"], keys["eager"]}) == 3
    assert "_experts_implementation" not in key_material(tiny_llama(), (), token_inputs())["model"]["config"]


def test_tied_vs_untied_changes_key(gpt2, base_key):
    from transformers import GPT2LMHeadModel

    # untied through the config
    config = gpt2.config.__class__.from_dict({**gpt2.config.to_dict(), "tie_word_embeddings": False})
    config._attn_implementation = "sdpa"
    assert _key(GPT2LMHeadModel(config).eval()) != base_key
    # untied by hand, config unchanged: only the tie column of the tensor list differs
    untied = tiny_gpt2()
    assert untied.lm_head.weight is untied.transformer.wte.weight
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    assert _key(untied) != base_key
    a, b = key_material(tiny_gpt2(), (), token_inputs()), key_material(untied, (), token_inputs())
    assert a["model"]["config"] == b["model"]["config"] and a["model"]["tensors"] != b["model"]["tensors"]


_MODEL_SRC = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2
"""


def _write_module(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))
    st = path.stat()  # make sure the mtime moves on even on coarse-clock filesystems
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000 * (1 + int(uuid.uuid4().int % 7))))


@pytest.fixture
def source_module(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"gpc_keysrc_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    _write_module(path, _MODEL_SRC)
    yield name, path
    sys.modules.pop(name, None)


def test_model_source_change_changes_key(source_module):
    name, path = source_module
    x = torch.randn(2, 4)
    mod = importlib.import_module(name)
    key_a, mat_a = cache_key(mod.Net(), x), key_material(mod.Net(), (x,), {})
    assert cache_key(mod.Net(), x) == key_a  # deterministic

    _write_module(path, _MODEL_SRC + "\n# a comment\n")
    mod = importlib.reload(mod)
    key_b, mat_b = cache_key(mod.Net(), x), key_material(mod.Net(), (x,), {})
    assert key_b != key_a
    # only the source digests differ (same module name, same structure)
    assert mat_a["model"]["sources"] != mat_b["model"]["sources"]
    assert {k: v for k, v in mat_a["model"].items() if k != "sources"} == {
        k: v for k, v in mat_b["model"].items() if k != "sources"
    }

    # a fresh module name for the changed file: also a different key
    fresh = f"{name}_b"
    shutil.copy(path, path.with_name(f"{fresh}.py"))
    try:
        assert cache_key(importlib.import_module(fresh).Net(), x) != key_a
    finally:
        sys.modules.pop(fresh, None)


# ------------------------------------------------------------------------------------------------
# Same key
# ------------------------------------------------------------------------------------------------


def test_name_or_path_does_not_change_key(base_key):
    model = tiny_gpt2()
    model.config._name_or_path = "/home/someone/else/checkpoints/gpt2"
    assert _key(model) == base_key


def test_working_directory_does_not_change_key(gpt2, base_key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _key(gpt2) == base_key


def test_parameter_values_do_not_change_key(base_key):
    other = tiny_gpt2(seed=123)
    assert not torch.equal(other.transformer.h[0].mlp.c_fc.weight, tiny_gpt2().transformer.h[0].mlp.c_fc.weight)
    assert _key(other) == base_key
    assert _key(tiny_llama(seed=1)) == _key(tiny_llama(seed=2))


def test_input_sizes_do_not_change_key(gpt2, base_key):
    assert base_key == cache_key(gpt2, **token_inputs(batch=2, seq=8))
    assert cache_key(gpt2, **token_inputs(batch=3, seq=13)) == base_key
    assert cache_key(gpt2, **token_inputs(batch=5, seq=2)) == base_key
    # sizes of 1 share the key of larger sizes: one key holds the variants of both, whether
    # one graph serves both or not (a size of 0 is its own class)
    assert cache_key(gpt2, **token_inputs(batch=1, seq=8)) == base_key
    assert cache_key(gpt2, **token_inputs(batch=1, seq=1)) == base_key
    assert cache_key(gpt2, **token_inputs(batch=0, seq=8)) != base_key


def _save_and_reload(model, dirs):
    from transformers import AutoModelForCausalLM

    out = []
    for d in dirs:
        model.save_pretrained(d)
        loaded = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
        assert loaded.config._name_or_path == str(d)
        out.append(loaded)
    return out


def test_save_pretrained_two_dirs_same_key(tmp_path):
    for make in (tiny_gpt2, tiny_llama):
        a, b = _save_and_reload(make(), [tmp_path / make.__name__ / "one", tmp_path / make.__name__ / "elsewhere" / "two"])
        assert _key(a) == _key(b)
