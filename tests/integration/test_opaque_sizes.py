"""An opaque module inside a transformers causal LM keeps the graphs around it shape-generic:
other batch sizes and sequence lengths run the same variant, and cached generation adds the
decode graph once, not a graph per token. XGLM's positional embedding, made opaque, takes the
key/value cache's length as a Python int (a symbolic size while tracing). Oracles: the plain
model's logits and its own ``generate``."""

import pytest
import torch

from graphpatch_cache import ExtractionOptions, PatchableGraph

from tiny_models import tiny_xglm  # noqa: E402

pytestmark = pytest.mark.slow  # extracts an XGLM


def _ids(batch, seq):
    return torch.randint(2, 128, (batch, seq), generator=torch.Generator().manual_seed(100 * batch + seq))


@pytest.fixture(scope="module")
def model():
    return tiny_xglm(n_layer=2)


@pytest.fixture(scope="module")
def pg(model):
    from transformers.models.xglm.modeling_xglm import XGLMSinusoidalPositionalEmbedding

    options = ExtractionOptions(classes_to_skip_compiling=(XGLMSinusoidalPositionalEmbedding,))
    return PatchableGraph(model, options, input_ids=_ids(2, 8), use_cache=True)  # (the prompt's graph)


def _dims(artifact):
    return [leaf.get("dims") for leaf in artifact.signature["leaves"]]


def test_other_sizes_run_the_same_variant(pg, model):
    assert {g.module_path: g.kind for g in pg.artifact.root.walk()}["model.embed_positions"] == "opaque"
    assert pg.artifact.extraction["shape_specialized"] == {}
    for batch, seq in [(3, 11), (2, 5), (4, 16)]:
        ids = _ids(batch, seq)
        assert torch.equal(pg(input_ids=ids, use_cache=True).logits, model(input_ids=ids, use_cache=True).logits)
    assert len(pg.variants) == 1
    # batch 1: the same variant (nothing the model or the opaque call's symbolic run does
    # branches on a batch of 1: see test_size_one.py), generic in the sequence length
    for seq in (5, 9):
        ids = _ids(1, seq)
        assert torch.equal(pg(input_ids=ids, use_cache=True).logits, model(input_ids=ids, use_cache=True).logits)
    assert len(pg.variants) == 1
    assert _dims(pg.variants[0])[0] == ["dyn1", "dyn"]


def test_cached_generation_extracts_the_decode_graph_once(pg, model):
    before = len(pg.variants)
    ids = _ids(2, 6)
    got = pg.generate(ids, max_new_tokens=5, use_cache=True)
    expected = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(got, expected)
    # the prompt's graph (generate passes a mask and position ids, as model.generate does),
    # then every later token one decode graph (not one per token)
    added = pg.variants[before:]
    assert len(added) == 2
    assert all(a.extraction["shape_specialized"] == {} for a in added)
    decode = _dims(added[1])
    assert decode[0] == ["dyn", 1] and decode[-2][2] == "dyn1"  # one new token, any cache length
    # another prompt length and more tokens: no new graph
    ids = _ids(3, 9)
    got = pg.generate(ids, max_new_tokens=7, use_cache=True)
    expected = model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False, use_cache=True)
    assert torch.equal(got, expected)
    assert len(pg.variants) == before + 2
