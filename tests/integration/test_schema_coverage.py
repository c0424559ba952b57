"""``cache_schema/artifact-v1.schema.json`` covers what extraction writes and the loader reads.

Oracles: the schema file of this checkout (compiled here with fastjsonschema, as the loader
compiles the shipped copy) and artifacts that :func:`graphpatch_cache.extraction.extract`
writes for two tiny transformers models. The walk in :func:`undeclared` follows the artifact
and the schema side by side: a key is declared when the schema names it in ``properties`` or
gives ``additionalProperties`` a schema (a map); an object schema with neither is opaque
(compared as a whole), which only :data:`OPAQUE` may be.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, List

import fastjsonschema
import pytest
import torch

from graphpatch_cache.artifact import GraphArtifact, validate_artifact
from schema_walk import SCHEMA, undeclared


def _tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config).eval()


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def written() -> Dict[str, Dict[str, Any]]:
    """Artifacts as extraction writes them (their JSON, decoded): GPT-2 with an attention
    mask; Llama with a constant argument and an opaque MLP (opaque
    graphs carry ``input_spec``, ``attributes`` and the ``opaque`` record)."""
    from graphpatch_cache import ExtractionOptions
    from graphpatch_cache.extraction import extract
    from transformers.models.llama.modeling_llama import LlamaMLP

    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    gpt2 = extract(_tiny_gpt2(), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    llama = extract(_tiny_llama(), (ids,), {"use_cache": False},
                    ExtractionOptions(classes_to_skip_compiling=LlamaMLP))
    return {"gpt2": json.loads(gpt2.to_json()), "llama": json.loads(llama.to_json())}


def _graphs(graph: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [graph] + [g for child in graph["children"] for g in _graphs(child)]


@pytest.mark.slow
def test_written_artifacts_validate(written):
    validator = fastjsonschema.compile(copy.deepcopy(SCHEMA))  # (compile rewrites $refs in place)
    for name, data in written.items():
        validator(data)  # this checkout's schema (raises naming the first field that does not fit)
        validate_artifact(data)  # the loader's door, with the schema the package ships
        assert GraphArtifact.from_dict(data).to_json() == json.dumps(data, sort_keys=True, separators=(",", ":")), name


@pytest.mark.slow
def test_schema_declares_every_written_key(written):
    llama = written["llama"]
    # the fixture covers what it claims: the fields the loader depends on are present
    assert {"structure", "sources", "devices", "training", "options"} <= set(llama["extraction"])
    opaque = [g for g in _graphs(llama["root"]) if g["kind"] == "opaque"]
    assert opaque and all(g["input_spec"] for g in opaque)
    assert any(g["attributes"] for g in _graphs(llama["root"]))
    assert any(leaf["kind"] == "const" for leaf in llama["signature"]["leaves"])
    assert llama["extraction"]["sources"], "the tiny Llama's traced modeling file is recorded"
    for name, data in written.items():
        problems = undeclared(data, SCHEMA, "", [])
        assert not problems, f"{name}: keys the schema does not declare:\n  " + "\n  ".join(problems)


@pytest.mark.slow
def test_recorded_structure_and_sources_are_the_live_models(written):
    """What the schema describes is what the loader compares: the live model's lists and the
    digests of the files it was traced from."""
    from graphpatch_cache.live.sources import current_module_digest
    from graphpatch_cache.live.structure import structure

    recorded = written["gpt2"]["extraction"]
    assert recorded["structure"] == json.loads(json.dumps(structure(_tiny_gpt2())))
    assert "transformers.models.gpt2.modeling_gpt2" in recorded["sources"]
    for module, digest in recorded["sources"].items():
        assert current_module_digest(module) == digest, module


# -- hand-made artifacts (no extraction) -------------------------------------------------------
