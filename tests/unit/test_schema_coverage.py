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

import fastjsonschema
import pytest

from graphpatch_cache.artifact import GraphArtifact, schema_text, validate_artifact
from graphpatch_cache.errors import ArtifactFormatError, GraphPatchCacheError
from graphpatch_cache.trust.validate import check_artifact
from schema_walk import SCHEMA, SCHEMA_FILE, minimal_artifact, undeclared


def test_the_package_ships_this_schema():
    assert schema_text(1) == SCHEMA_FILE.read_text(), (
        "graphpatch_cache.cache_schema is not this checkout's cache_schema/ (an install of another checkout): "
        "install this one (pip install -e .) so the loader validates with the schema under test")


def test_a_hand_made_artifact_validates():
    data = minimal_artifact()
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
    data = minimal_artifact()
    data["extraction"]["structure"] = structure
    with pytest.raises(GraphPatchCacheError) as caught:
        validate_artifact(data)
    message = str(caught.value)
    assert "does not match schema_version 1" in message and "extraction.structure" in message, (why, message)


@pytest.mark.parametrize("sources", [["transformers"], {"m": 3}, {"m": "not a digest"}])
def test_wrong_typed_sources_are_rejected(sources):
    data = minimal_artifact()
    data["extraction"]["sources"] = sources
    with pytest.raises(GraphPatchCacheError, match=r"extraction\.sources"):
        validate_artifact(data)


def test_structure_and_sources_stay_optional():
    """Artifacts that record neither (written before they existed) still validate: the
    loader copes (no structure check at bind, no source re-check; a cache entry without a
    structure cannot prove its key and is rebuilt)."""
    data = minimal_artifact()
    del data["extraction"]["structure"], data["extraction"]["sources"]
    validate_artifact(copy.deepcopy(data))


def test_a_signature_leaf_must_be_complete():
    data = minimal_artifact()
    del data["signature"]["leaves"][0]["dims"]
    with pytest.raises(GraphPatchCacheError, match=r"signature\.leaves"):
        validate_artifact(data)


@pytest.mark.parametrize("devices", [["file:///etc"], ["cuda:x"], "cpu", [3]])
def test_a_malformed_device_list_is_a_typed_refusal_before_binding(devices):
    """``extraction.devices`` is parsed at bind: a malformed entry is refused by the loader's
    checks (typed, naming the field) instead of surfacing as torch's RuntimeError."""
    data = minimal_artifact()
    data["extraction"]["devices"] = devices
    artifact = GraphArtifact.from_dict(data)
    with pytest.raises(ArtifactFormatError, match=r"extraction\.devices"):
        check_artifact(artifact)
    data["extraction"]["devices"] = ["cpu", "cuda:0"]
    check_artifact(GraphArtifact.from_dict(data))  # well-formed names pass
