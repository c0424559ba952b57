"""Fixtures of the integration tests: each extracts a tiny model once, so a module that uses one is
marked ``slow`` (the setup is charged to its first test)."""

from __future__ import annotations

import shutil

import pytest

from graphpatch_cache import PatchableGraph, load_cached
from store_files import logits, store
from tiny_models import tiny_gpt2, token_inputs


@pytest.fixture(scope="session")
def gpt2_18():
    """GPT-2 with 18 layers (so the seed path transformer.h_17 exists), and its PatchableGraph."""
    model = tiny_gpt2(n_layer=18)
    inputs = token_inputs()
    return model, inputs, PatchableGraph(model, **inputs)


@pytest.fixture(scope="session")
def m1(tmp_path_factory):
    """(model, inputs, expected logits, primed root, primed local dir, fresh PatchableGraph).

    The primed root holds the one entry that ``load_cached(model, **inputs)`` stores. One
    in-process extraction shared by the cache-store files (``test_cache_store*.py``, one module
    before the split, which shared it already); tests copy the root (``primed``)."""
    base = tmp_path_factory.mktemp("primed")
    model = tiny_gpt2(n_layer=1)
    inputs = token_inputs()
    expected = logits(model, inputs)
    pg = load_cached(model, store=store(base / "root", base / "local"), **inputs)
    assert pg.cache_stats.misses == 1 and pg.cache_stats.hits == 0
    fresh = PatchableGraph(model, **inputs)
    return model, inputs, expected, base / "root", base / "local", fresh


@pytest.fixture
def primed(m1, tmp_path):
    """A copy of the primed root (and its local tier) under tmp_path."""
    shutil.copytree(m1[3], tmp_path / "root")
    shutil.copytree(m1[4], tmp_path / "local")
    return tmp_path / "root", tmp_path / "local"
