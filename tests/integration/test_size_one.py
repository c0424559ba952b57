"""A size of 1 shares graphs with sizes >= 2 where the model's code does not branch on it.

After a batch-2 ``load_cached``, a batch-1 call is a hit: no new variant, no extraction, no
NewVariantWarning; and the other way round. Where the model's code takes another path at
size 1 (a module written here that does, and transformers' own ``batch_size != 1`` branch
when neither an attention mask nor a cache is passed), size 1 gets a variant of its own, and
every call gives the plain model's outputs.

Oracles: the plain model's output (torch.equal), the number of variants in memory and of
refs on disk, warnings, the miss count, the signature the artifact records.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from store_files import refs, store
from tiny_models import tiny_gpt2, tiny_llama, token_inputs

from graphpatch_cache import NewVariantWarning, PatchableGraph, load_cached

pytestmark = pytest.mark.slow  # extracts tiny models


def _inputs(batch, seq, *, mask, seed=1):
    """A tokenizer's batch (``mask``) or bare ids, with the model's default ``use_cache``."""
    inputs = token_inputs(batch=batch, seq=seq, mask=mask, seed=seed)
    del inputs["use_cache"]
    return inputs


def _call(pg, inputs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = pg(**inputs)
    return out, [str(w.message) for w in record if issubclass(w.category, NewVariantWarning)]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return tiny_llama(n_layer=1) if request.param == "llama" else tiny_gpt2(n_layer=1)


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "ids-only"])
def test_batch_one_after_a_batch_two_load_is_a_hit(model, mask, tmp_path):
    root, local = tmp_path / "root", tmp_path / "local"
    pg = load_cached(model, store=store(root, local), **_inputs(2, 8, mask=mask))
    assert pg.cache_stats.misses == 1 and len(refs(root)) == 1
    for batch, seq in [(1, 8), (1, 3), (3, 5), (5, 2)]:
        inputs = _inputs(batch, seq, mask=mask, seed=batch + seq)
        out, said = _call(pg, inputs)
        assert said == [] and len(pg.variants) == 1, (batch, seq, said)
        assert torch.equal(out.logits, model(**inputs).logits)
    # another process with a batch-1 call: the stored batch-2 graph serves it
    again = load_cached(model, store=store(root, local), **_inputs(1, 6, mask=mask, seed=4))
    assert again.cache_stats.misses == 0 and len(refs(root)) == 1
    dims = again.artifact.signature["leaves"][0]["dims"]
    assert dims == ["dyn1", "dyn"]  # batch: any size >= 1; length: >= 2 (sdpa's is_causal branch)


def test_a_batch_one_build_serves_larger_batches(model):
    inputs = _inputs(1, 8, mask=True)
    pg = PatchableGraph(model, **inputs)
    for batch in (2, 3):
        other = _inputs(batch, 7, mask=True, seed=batch)
        out, said = _call(pg, other)
        assert said == [] and len(pg.variants) == 1
        assert torch.equal(out.logits, model(**other).logits)


def test_the_quickstart_call_shares_batch_one_and_keeps_length_one_apart(tmp_path):
    """Ids only, ``use_cache=False`` (the README's call): transformers expands the position ids
    when ``batch_size != 1``, a branch reviewed as computing the same values at batch 1
    (``SIZE_ONE_NEUTRAL``), so batch 1 is a hit; sdpa's ``is_causal = q_length > 1`` is a real
    branch, so length 1 gets a variant of its own, stored under the same key."""
    model = tiny_gpt2(n_layer=1)
    root, local = tmp_path / "root", tmp_path / "local"
    pg = load_cached(model, store=store(root, local), **token_inputs(2, 8))
    assert pg.artifact.signature["leaves"][0]["dims"] == ["dyn1", "dyn"]
    one = token_inputs(1, 8, seed=3)
    out, said = _call(pg, one)
    assert said == [] and len(pg.variants) == 1 and torch.equal(out.logits, model(**one).logits)
    short = token_inputs(2, 1, seed=4)
    out, said = _call(pg, short)
    assert len(said) == 1 and "size 1 in dimension 1" in said[0] and "branches" in said[0]
    assert torch.equal(out.logits, model(**short).logits) and len(pg.variants) == 2
    assert len(refs(root)) == 2 and len({p.parent for p in refs(root)}) == 1


def test_a_neutral_branch_is_matched_by_its_source_text():
    from transformers import masking_utils

    from graphpatch_cache.integrations.transformers import size_one_neutral

    lines = open(masking_utils.__file__).read().splitlines()
    n = lines.index("        if batch_size != position_ids.shape[0]:") + 1
    where = f"if batch_size != position_ids.shape[0]:  # transformers/masking_utils.py:{n} in _preprocess_mask_arguments"
    assert size_one_neutral(where)
    assert not size_one_neutral(where.replace(f":{n} ", f":{n + 1} "))  # the text there differs
    assert not size_one_neutral(where.replace("_preprocess_mask_arguments", "other"))
    assert not size_one_neutral(None) and not size_one_neutral("if x.shape[0] == 1:  # mine.py:3 in forward")


class BranchesOnBatchOne(torch.nn.Module):
    """Takes another path for a batch of one: the graph of batch 2 must not serve it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if x.shape[0] == 1:
            return h * 2
        return h + 1


class SizeGeneric(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)).sum(-1, keepdim=True) * x.shape[0]


def test_a_branch_on_size_one_gets_its_own_variant():
    torch.manual_seed(0)
    model = BranchesOnBatchOne().eval()
    pg = PatchableGraph(model, torch.randn(2, 3, 4))
    assert pg.artifact.signature["leaves"][0]["dims"] == ["dyn", "dyn1", 4]
    for shape in [(1, 3, 4), (1, 1, 4), (3, 1, 4), (5, 2, 4)]:
        x = torch.randn(shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NewVariantWarning)
            assert torch.equal(pg(x), model(x)), shape
    assert len(pg.variants) == 2  # batch 1 (any length) apart, every other batch shared
    # traced at batch 1 first: that graph serves batch 1 only
    first_one = PatchableGraph(model, torch.randn(1, 3, 4))
    assert first_one.artifact.signature["leaves"][0]["dims"] == [1, "dyn1", 4]


def test_size_generic_module_shares_every_size():
    torch.manual_seed(0)
    model = SizeGeneric().eval()
    pg = PatchableGraph(model, torch.randn(1, 1, 4))
    assert pg.artifact.signature["leaves"][0]["dims"] == ["dyn1", "dyn1", 4]
    for shape in [(2, 3, 4), (1, 7, 4), (6, 1, 4)]:
        x = torch.randn(shape)
        out, said = _call(pg, {"x": x})
        assert said == [] and torch.equal(out, model(x))
    assert len(pg.variants) == 1


def test_generation_at_batch_one_reuses_the_batch_two_graphs():
    """Cached generation: the prefill and decode-step graphs of a batch-2 generate serve a
    batch-1 generate (the decode step's length of 1 stays its own graph: sdpa's is_causal
    depends on it)."""
    model = tiny_llama(n_layer=1)
    ids = token_inputs(2, 6)["input_ids"]
    mask = torch.ones_like(ids)
    pg = PatchableGraph(model, ids, attention_mask=mask)
    both = pg.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(both, model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False))
    decode = [v for v in pg.variants if v.signature["leaves"][0]["dims"] == ["dyn1", 1]]
    assert len(decode) == 1  # the decode step: any batch >= 1, length 1
    before = len(pg.variants)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewVariantWarning)
        one = pg.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(one, model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3, do_sample=False))
    assert len(pg.variants) == before
