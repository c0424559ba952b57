"""``store=`` names the graph store; ``cache=`` for a graph store still works but is
deprecated (a ``DeprecationWarning`` naming ``store=``), and a transformers ``Cache`` passed
as ``cache=`` is the model's own key/value cache argument.

Oracles: the warnings raised (category and text), the files the store holds on disk, the
unwrapped model's outputs (torch.equal), and the cache key computed with and without the
key/value cache as an input."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from graphpatch_cache import CacheStore, build, cache_key, load_cached


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def _ids(seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 64, (2, seq), generator=torch.Generator().manual_seed(seed))


def _store_warnings(record: list) -> list:
    return [w for w in record if issubclass(w.category, DeprecationWarning) and "store=" in str(w.message)]


def _refs(root) -> list:
    return sorted((root / "refs").glob("*/*.json")) if (root / "refs").is_dir() else []


@pytest.fixture
def default_root(tmp_path, monkeypatch):
    """The default store lives under tmp_path (never the user's cache)."""
    monkeypatch.setenv("GRAPHPATCH_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.setenv("GRAPHPATCH_CACHE_LOCAL_DIR", str(tmp_path / "default-local"))
    return tmp_path / "default"


def test_a_graph_store_as_cache_warns_and_is_still_used(tmp_path, default_root):
    model, ids = _model(), _ids()
    root = tmp_path / "root"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, cache=CacheStore(root, local_dir=False), input_ids=ids)
    found = _store_warnings(record)
    assert len(found) == 1 and "load_cached(cache=...)" in str(found[0].message)
    assert found[0].filename == __file__  # points at the caller
    assert len(_refs(root)) == 1 and not _refs(default_root)  # the store it named, not the default
    assert torch.equal(pg(input_ids=ids).logits, model(input_ids=ids).logits)
    with warnings.catch_warnings(record=True) as record:  # a path works the same way
        warnings.simplefilter("always")
        again = load_cached(model, cache=str(root), input_ids=ids)
    assert len(_store_warnings(record)) == 1
    assert (again.cache_stats.hits, again.cache_stats.misses) == (1, 0)


def test_store_does_not_warn(tmp_path, default_root):
    model, ids = _model(), _ids()
    root = tmp_path / "root"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = load_cached(model, store=CacheStore(root, local_dir=False), input_ids=ids)
        second = load_cached(model, store=str(root), input_ids=ids)
    assert _store_warnings(record) == []
    assert (first.cache_stats.misses, second.cache_stats.hits) == (1, 1)
    assert len(_refs(root)) == 1 and not _refs(default_root)


def test_a_dynamic_cache_as_cache_reaches_the_model(tmp_path, default_root):
    model = _model()
    prefix = model(input_ids=_ids(seq=4), use_cache=True).past_key_values
    assert isinstance(prefix, DynamicCache)

    def copy() -> DynamicCache:
        return DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in prefix.layers])

    token = _ids(seq=1, seed=7)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, input_ids=token, cache=copy(), use_cache=True)
    assert _store_warnings(record) == []
    # the key was computed with the key/value cache as one of the model's inputs
    assert pg.cache_stats.keys == [cache_key(model, input_ids=token, cache=copy(), use_cache=True)]
    assert pg.cache_stats.keys[0] != cache_key(model, input_ids=token, use_cache=True)
    assert len(_refs(default_root)) == 1  # stored in the default store
    mine, theirs = copy(), copy()
    ours = pg(input_ids=token, cache=mine, use_cache=True)
    ref = model(input_ids=token, cache=theirs, use_cache=True)
    assert torch.equal(ours.logits, ref.logits)
    assert mine.get_seq_length() == theirs.get_seq_length() == 5  # the caller's cache grew, as the model's does


def test_build_takes_store_and_warns_for_cache(tmp_path, default_root):
    config = _model().config
    root = tmp_path / "root"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = build(config, store=CacheStore(root, local_dir=False))
    assert _store_warnings(record) == [] and not result.cached and len(_refs(root)) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = build(config, cache=CacheStore(root, local_dir=False))
    found = _store_warnings(record)
    assert len(found) == 1 and "build(cache=...)" in str(found[0].message)
    assert again.cached and again.key == result.key and not _refs(default_root)
