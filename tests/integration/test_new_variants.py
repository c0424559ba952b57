"""A call that fits none of the graphs extracted so far says so before it extracts a new graph
variant (which input differs, old vs new, how long the last extraction took, how to avoid it),
or is refused (``on_new_variant="error"``), or extracts silently (``"extract"``); a variant the
cache already holds is a hit and says nothing.

Oracles: the unwrapped model's output (torch.equal), the number of variants, warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from store_files import store
from tiny_models import tiny_gpt2, token_inputs

from graphpatch_cache import ExtractionOptions, NewVariantWarning, PatchableGraph, SignatureMismatchError, load_cached

pytestmark = pytest.mark.slow  # extracts tiny GPT-2 variants


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=1)


def _call(pg, **inputs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = pg(**inputs)
    return out, [str(w.message) for w in record if issubclass(w.category, NewVariantWarning)]


def test_an_on_demand_extraction_says_why_before_it_runs_and_only_once(model):
    inputs = token_inputs()
    pg = PatchableGraph(model, **inputs)
    int32 = {**inputs, "input_ids": inputs["input_ids"].to(torch.int32)}
    out, said = _call(pg, **int32)
    assert torch.equal(out.logits, model(**int32).logits) and len(pg.variants) == 2
    (message,) = said
    assert "input 'input_ids': extracted for dtype int64, called with int32" in message
    assert "tokenizers return int64 ids; cast with `.long()`" in message  # the way back to the int64 graphs
    assert "the last extraction in this process took" in message and "graphpatch-cache build" in message
    assert _call(pg, **int32)[1] == []  # the variant exists now
    # a length of 1 is a new variant (sdpa branches on it; batch 1 shares: test_size_one.py)
    one = {**inputs, "input_ids": inputs["input_ids"][:, :1]}
    out, (message,) = _call(pg, **one)
    assert "size 1 in dimension 1" in message and torch.equal(out.logits, model(**one).logits)


def test_on_new_variant_error_refuses_and_extract_is_silent(model):
    inputs = token_inputs()
    strict = PatchableGraph(model, ExtractionOptions(on_new_variant="error"), **inputs)
    one = {**inputs, "input_ids": inputs["input_ids"][:, :1]}
    with pytest.raises(SignatureMismatchError, match="size 1 in dimension 1") as err:
        strict(**one)
    assert "on_new_variant" in str(err.value) and len(strict.variants) == 1
    assert torch.equal(strict(**inputs).logits, model(**inputs).logits)  # known signatures still run
    quiet = PatchableGraph(model, ExtractionOptions(on_new_variant="extract"), **inputs)
    out, said = _call(quiet, **one)
    assert said == [] and len(quiet.variants) == 2 and torch.equal(out.logits, model(**one).logits)
    with pytest.raises(ValueError, match="on_new_variant"):
        ExtractionOptions(on_new_variant="ask")


def test_a_variant_the_cache_holds_is_a_hit_and_says_nothing(model, tmp_path):
    inputs = token_inputs()
    int32 = {**inputs, "input_ids": inputs["input_ids"].to(torch.int32)}
    first = load_cached(model, store=store(tmp_path / "root", tmp_path / "local"), **inputs)
    assert len(_call(first, **int32)[1]) == 1  # not cached yet: extracted, and said
    again = load_cached(model, store=store(tmp_path / "root", tmp_path / "local"), **inputs)
    out, said = _call(again, **int32)
    assert said == [] and torch.equal(out.logits, model(**int32).logits)
    assert again.cache_stats.misses == 0
    # "error" refuses extracting, not loading: a cached variant still serves the call (options
    # may come first among the inputs, as PatchableGraph takes them)
    strict = load_cached(model, ExtractionOptions(on_new_variant="error"),
                         store=store(tmp_path / "root", tmp_path / "local"), **inputs)
    assert torch.equal(strict(**int32).logits, model(**int32).logits)
