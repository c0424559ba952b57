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
from pathlib import Path
from typing import Any, Dict, List

import fastjsonschema
import pytest
import torch

from graphpatch_cache.artifact import GraphArtifact, schema_text, validate_artifact
from graphpatch_cache.errors import GraphPatchCacheError

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "cache_schema" / "artifact-v1.schema.json"
SCHEMA: Dict[str, Any] = json.loads(SCHEMA_FILE.read_text())

#: paths (``[]`` for any list element) whose object schema declares no keys on purpose, by
#: their ending: the extraction options (``ExtractionOptions.fingerprint()``, compared as a
#: whole with the key's) and a signature's constants (compared with a call's, never decoded)
OPAQUE = ("extraction.options", "leaves[].value")


def _resolve(schema: Dict[str, Any]) -> Dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/definitions/"), ref
        schema = SCHEMA["definitions"][ref.rsplit("/", 1)[1]]
    return schema


_JSON_TYPES = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool}


def _type_fits(value: Any, schema: Dict[str, Any]) -> bool:
    schema = _resolve(schema)
    if "const" in schema:
        return value == schema["const"]
    kinds = schema.get("type")
    if kinds is None:
        if "properties" in schema:
            return isinstance(value, dict)
        return True
    for kind in [kinds] if isinstance(kinds, str) else kinds:
        if kind == "integer" and type(value) is int:
            return True
        if kind in _JSON_TYPES and type(value) is _JSON_TYPES[kind]:
            return True
    return False


def _branch(value: Any, schema: Dict[str, Any]) -> Dict[str, Any]:
    """The branch of an ``anyOf``/``oneOf`` that ``value`` takes: the right type, and the
    same value for each ``const`` property (a signature leaf's ``kind``)."""
    for key in ("anyOf", "oneOf"):
        if key in schema:
            for option in schema[key]:
                option = _resolve(option)
                if not _type_fits(value, option):
                    continue
                consts = {k: p["const"] for k, p in option.get("properties", {}).items() if "const" in p}
                if isinstance(value, dict) and any(k in value and value[k] != c for k, c in consts.items()):
                    continue
                return _branch(value, option)
            raise AssertionError(f"no branch of {schema[key]} fits {value!r:.200}")
    return schema


def undeclared(value: Any, schema: Dict[str, Any], path: str, out: List[str]) -> List[str]:
    schema = _branch(value, _resolve(schema))
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            if not path.endswith(OPAQUE):
                out.append(f"{path or '<artifact>'}: an object the schema does not describe (keys {sorted(value)[:8]})")
            return out
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                undeclared(item, props[key], where, out)
            elif isinstance(extra, dict):
                undeclared(item, extra, f"{path}.*" if path else "*", out)
            else:
                out.append(f"{where}: key {key!r} is not declared in the schema (add it to the properties at {path})")
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, list):  # a tuple: one schema per position
            for item, sub in zip(value, items):
                undeclared(item, sub, f"{path}[]", out)
        elif isinstance(items, dict):
            for item in value:
                undeclared(item, items, f"{path}[]", out)
    return out


# -- artifacts this release writes -------------------------------------------------------------
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
def _minimal() -> Dict[str, Any]:
    """A valid one-graph artifact: ``x -> output``, the model a bare ``nn.Identity``."""
    spec = ('[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", '
            '"context": "null", "children_spec": [{"type": null, "context": null, "children_spec": []}]}, '
            '{"type": "builtins.dict", "context": "[]", "children_spec": []}]}]')
    return {
        "schema_version": 1,
        "model_class": "torch.nn.modules.linear.Identity",
        "input_spec": spec,
        "signature": {"spec": spec, "leaves": [{"kind": "tensor", "dtype": "float32", "device": "cpu",
                                                "dims": ["dyn"]}]},
        "root": {"name": "", "module_path": "", "module_class": "torch.nn.modules.linear.Identity",
                 "kind": "compiled", "call_index": 0, "attributes": {}, "children": [], "code": "",
                 "input_spec": None, "call_signature": None,
                 "nodes": [
                     {"name": "x", "op": "placeholder", "target": "x", "args": {"t": []}, "kwargs": {"d": []},
                      "meta": {"shape": ["s0"], "dtype": "float32", "input": ["input"]}},
                     {"name": "output", "op": "output", "target": "output", "args": {"t": [{"n": "x"}]},
                      "kwargs": {"d": []}, "meta": {"shape": ["s0"], "dtype": "float32"}}]},
        "extraction": {"options": {}, "devices": ["cpu"], "training": False, "opaque": {}, "shape_specialized": {},
                       "data_dependent": {},
                       "structure": {"modules": [["", "torch.nn.modules.linear.Identity"]], "tensors": []},
                       "sources": {"torch.nn.modules.linear": "0" * 64}},
        "versions": {"torch": torch.__version__},
    }


def test_the_package_ships_this_schema():
    assert schema_text(1) == SCHEMA_FILE.read_text(), (
        "graphpatch_cache.cache_schema is not this checkout's cache_schema/ (an install of another checkout): "
        "install this one (pip install -e .) so the loader validates with the schema under test")


def test_a_hand_made_artifact_validates():
    data = _minimal()
    fastjsonschema.compile(copy.deepcopy(SCHEMA))(data)
    validate_artifact(data)
    assert undeclared(data, SCHEMA, "", []) == []


@pytest.mark.parametrize("structure, why", [
    (["modules", "tensors"], "structure must be object"),
    ({"modules": [["", 3]], "tensors": []}, "a class name that is not a string"),
    ({"modules": [], "tensors": [["param", "weight", [2, 2], "torch.float32"]]}, "a tensor entry of 4 fields"),
    ({"modules": [], "tensors": [["weights", "weight", [2], "torch.float32", None]]}, "a kind other than param/buffer"),
    ({"modules": [], "tensors": [["param", "weight", ["2"], "torch.float32", None]]}, "a size that is a string"),
    ({"modules": []}, "no tensors list"),
    (None, "null"),
])
def test_a_wrong_typed_structure_is_rejected(structure, why):
    data = _minimal()
    data["extraction"]["structure"] = structure
    with pytest.raises(GraphPatchCacheError) as caught:
        validate_artifact(data)
    message = str(caught.value)
    assert "does not match schema_version 1" in message and "extraction.structure" in message, (why, message)


@pytest.mark.parametrize("sources", [["transformers"], {"m": 3}, {"m": "not a digest"}])
def test_wrong_typed_sources_are_rejected(sources):
    data = _minimal()
    data["extraction"]["sources"] = sources
    with pytest.raises(GraphPatchCacheError, match=r"extraction\.sources"):
        validate_artifact(data)


def test_structure_and_sources_stay_optional():
    """Artifacts that record neither (written before they existed) still validate: the
    loader copes (no structure check at bind, no source re-check; a cache entry without a
    structure cannot prove its key and is rebuilt)."""
    data = _minimal()
    del data["extraction"]["structure"], data["extraction"]["sources"]
    validate_artifact(copy.deepcopy(data))


def test_a_signature_leaf_must_be_complete():
    data = _minimal()
    del data["signature"]["leaves"][0]["dims"]
    with pytest.raises(GraphPatchCacheError, match=r"signature\.leaves"):
        validate_artifact(data)
