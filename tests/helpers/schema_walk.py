"""Walks an artifact's JSON alongside the artifact JSON Schema; a minimal hand-made artifact
(shared by the schema tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import torch


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
def minimal_artifact() -> Dict[str, Any]:
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


