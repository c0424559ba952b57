"""Patches never write into the model's weights or the caller's tensors (issue 10, bug 2):
a patch that may write in place (``requires_clone``, on for CustomPatch and user subclasses)
gets a clone, with grad on and off; the oracle is a snapshot of every parameter and input."""

from dataclasses import dataclass

import pytest
import torch

from tiny_models import tiny_gpt2, token_inputs
from graphpatch_cache import (AddPatch, CustomPatch, PatchableGraph, Patch, ProbePatch, RecordPatch, ReplacePatch,
                              ZeroPatch)

pytestmark = pytest.mark.slow  # the module fixture extracts a GPT-2

WEIGHT = "transformer.h_0.mlp.c_fc.weight"
HIDDEN = "transformer.h_0.mlp.c_fc.output"


@dataclass(kw_only=True)
class DoublesInPlace(Patch):
    """A user's own patch that writes into what it receives."""

    def apply(self, value):
        return value.mul_(2)


def _patches():
    return {
        "probe": lambda: ProbePatch(),
        "record": lambda: RecordPatch(),
        "zero": lambda: ZeroPatch(slice=(0,)),
        "add": lambda: AddPatch(value=1.0, slice=(slice(None), 0)),
        "replace": lambda: ReplacePatch(value=0.5, slice=(0,)),
        "custom-in-place": lambda: CustomPatch(custom_op=lambda v: v.add_(1.0)),
        "custom-fill": lambda: CustomPatch(custom_op=lambda v: v.fill_(0.0)),
        "subclass-in-place": lambda: DoublesInPlace(),
    }


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2(n_layer=1)
    inputs = token_inputs()
    return model, inputs, PatchableGraph(model, **inputs)


@pytest.mark.parametrize("grad", ["grad-on", "no_grad", "requires_grad_false"])
@pytest.mark.parametrize("kind", list(_patches()))
@pytest.mark.parametrize("node", [WEIGHT, HIDDEN])
def test_no_patch_writes_weights_or_inputs(gpt2, kind, grad, node):
    model, inputs, pg = gpt2
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = inputs["input_ids"].clone()
    if grad == "requires_grad_false":
        model.requires_grad_(False)
    try:
        with pg.patch({node: _patches()[kind]()}):
            if grad == "no_grad":
                with torch.no_grad():
                    out = pg(**inputs).logits
            else:
                out = pg(**inputs).logits
        if grad == "grad-on":
            out.sum().backward()  # no leaf-variable error, and gradients reach the weights
            assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
    finally:
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), f"{kind} ({grad}) wrote into {name}"
    assert torch.equal(inputs["input_ids"], ids)
    plain = model(**inputs).logits
    if kind in ("probe", "record"):
        assert torch.equal(out, plain)
    else:
        assert not torch.equal(out, plain)  # the patch did act, on a copy


def test_an_in_place_custom_op_changes_the_output_like_its_out_of_place_twin(gpt2):
    model, inputs, pg = gpt2
    with pg.patch({HIDDEN: CustomPatch(custom_op=lambda v: v.mul_(3.0))}):
        in_place = pg(**inputs).logits
    with pg.patch({HIDDEN: CustomPatch(custom_op=lambda v: v * 3.0, requires_clone=False)}):
        out_of_place = pg(**inputs).logits
    assert torch.equal(in_place, out_of_place)


def test_opting_out_of_the_clone_is_explicit(gpt2):
    """requires_clone=False is the user's promise not to write in place: the clone is skipped
    (the patch sees the value object itself)."""
    model, inputs, pg = gpt2
    seen = []
    with pg.patch({HIDDEN: CustomPatch(custom_op=lambda v: seen.append(v) or v, requires_clone=False)}):
        with pg.patch({HIDDEN: ProbePatch()}):
            pg(**inputs)
    assert seen and isinstance(seen[0], torch.Tensor)
