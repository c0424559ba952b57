import pytest
import torch

from graphpatch_cache import ProbePatch, ZeroPatch

pytestmark = pytest.mark.slow  # gpt2_18 extracts an 18-layer GPT-2


def test_seed_example_probe_and_zero(gpt2_18):
    model, inputs, pg = gpt2_18
    expected = model(**inputs).logits
    assert torch.equal(pg(**inputs).logits, expected)
    mlp = model.transformer.h[17].mlp
    seen = {}
    handle = mlp.act.register_forward_hook(lambda m, a, o: seen.__setitem__("act", o.detach().clone()))
    try:
        model(**inputs)
    finally:
        handle.remove()
    with pg.patch({"transformer.h_17.mlp.act.mul_3": [probe := ProbePatch(), ZeroPatch()],
                   "transformer.h_17.mlp.output": (mlp_probe := ProbePatch())}):
        pg(**inputs)
    assert torch.equal(probe.activation, seen["act"])
    bias = mlp.c_proj.bias
    assert torch.equal(mlp_probe.activation, bias.expand_as(mlp_probe.activation))
