"""The artifact's format checks without a model: an unknown schema_version names the supported
ones, and what is not an artifact is refused (the extracting half: tests/integration/test_artifact.py)."""

import json

import pytest

from graphpatch_cache.artifact import artifact_from_bytes
from graphpatch_cache.errors import GraphPatchCacheError


def test_unknown_schema_version_names_supported():
    with pytest.raises(GraphPatchCacheError, match=r"schema_version 99.*\[1\]"):
        artifact_from_bytes(json.dumps({"schema_version": 99}).encode(), "a.json")


def test_not_an_artifact():
    with pytest.raises(GraphPatchCacheError, match="not a graph artifact"):
        artifact_from_bytes(b"{]", "a.json")
    with pytest.raises(GraphPatchCacheError, match="not a graph artifact"):
        artifact_from_bytes(json.dumps({"hello": 1}).encode(), "a.json")
