"""PatchableGraph on a tiny GPT-2: patch targets, contexts, validation, errors, autograd,
NodePath features and call signatures. Extractions are module-scoped and few."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass

import pytest
import torch

from graphpatch_cache import (
    AddPatch,
    CustomPatch,
    NodePath,
    Patch,
    PatchableGraph,
    ProbePatch,
    RecordPatch,
    ReplacePatch,
    ZeroPatch,
)
from graphpatch_cache.errors import (
    GraphPatchCacheError,
    NodePathError,
    NotAValueError,
    PatchError,
    SignatureMismatchError,
)

from tiny_models import tiny_gpt2, token_inputs

pytestmark = pytest.mark.slow  # the module fixtures extract GPT-2s

MUL3 = "transformer.h_0.mlp.act.mul_3"


@pytest.fixture(scope="module")
def gpt2():
    """(model, inputs, pg, expected logits). Tests must leave pg with only its first variant."""
    model = tiny_gpt2(n_layer=2)
    inputs = token_inputs()  # batch 2, seq 8
    pg = PatchableGraph(model, **inputs)
    with torch.no_grad():
        expected = model(**inputs).logits
    return model, inputs, pg, expected


@pytest.fixture(scope="module")
def gpt2_variants():
    """A separate PatchableGraph on which tests may extract extra variants."""
    model = tiny_gpt2(n_layer=2)
    inputs = token_inputs()
    return model, inputs, PatchableGraph(model, **inputs)


@pytest.fixture(autouse=True)
def _clear_grads(request):
    yield
    for name in ("gpt2", "gpt2_variants"):
        if name in request.fixturenames:
            for p in request.getfixturevalue(name)[0].parameters():
                p.grad = None


def _run(pg, inputs):
    with torch.no_grad():
        return pg(**inputs).logits


def _hook_io(module, model, inputs):
    seen = {}

    def hook(m, args, out):
        seen["in"] = args[0].detach().clone()
        seen["out"] = out.detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


def _recorder(log, tag):
    return CustomPatch(custom_op=lambda v: (log.append(tag), v)[1])


# -- basics ----------------------------------------------------------------------------------------


def test_unpatched_is_exact(gpt2):
    model, inputs, pg, expected = gpt2
    assert torch.equal(_run(pg, inputs), expected)
    assert len(pg.variants) == 1


# -- parameter nodes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch",
    [
        ZeroPatch(),
        AddPatch(value=1.0),
        ZeroPatch(slice=(slice(None), slice(0, 8))),
        ReplacePatch(value=torch.zeros(32, 4), slice=(slice(None), slice(0, 4))),
        AddPatch(value=0.5, slice=0),
    ],
    ids=["zero", "add", "zero_slice", "replace_slice", "add_slice"],
)
def test_parameter_patch_leaves_weight_untouched(gpt2, patch):
    model, inputs, pg, expected = gpt2
    weight = model.transformer.h[0].mlp.c_fc.weight
    before, ptr, version = weight.detach().clone(), weight.data_ptr(), weight._version
    with pg.patch({"transformer.h_0.mlp.c_fc.weight": [probe := ProbePatch(), patch, after := ProbePatch()]}):
        out = _run(pg, inputs)
    assert torch.equal(probe.activation, before)
    assert torch.equal(after.activation, patch(before))
    assert not torch.equal(out, expected)
    assert torch.equal(weight, before) and weight.data_ptr() == ptr and weight._version == version
    assert model.transformer.h[0].mlp.c_fc.weight is weight
    assert torch.equal(_run(pg, inputs), expected)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_parameter_patch_matches_model_with_edited_weight(gpt2):
    model, inputs, pg, expected = gpt2
    bias = model.transformer.h[1].attn.c_proj.bias
    with pg.patch({"transformer.h_1.attn.c_proj.bias": AddPatch(value=0.25)}):
        patched = _run(pg, inputs)
    with torch.no_grad():
        bias.add_(0.25)
        try:
            edited = model(**inputs).logits
        finally:
            bias.sub_(0.25)
    torch.testing.assert_close(patched, edited)


# -- module inputs and outputs ----------------------------------------------------------------------


def test_placeholder_names_in_repr(gpt2):
    _, _, pg, _ = gpt2
    text = repr(pg.graph.transformer.h_0.mlp)
    assert re.search(r"hidden_states: Tensor\(float32\)\[\w+, \w+, 32\]", text)
    assert re.search(r"x: Tensor\(float32\)\[\w+, \w+, 32\]", repr(pg.graph.transformer.h_0.mlp.c_fc))
    assert re.search(r"input_ids: Tensor\(int64\)\[\w+, \w+\]", repr(pg.graph))


def test_probe_module_input_and_output(gpt2):
    model, inputs, pg, expected = gpt2
    seen = _hook_io(model.transformer.h[0].mlp, model, inputs)
    with pg.patch({
        "transformer.h_0.mlp.hidden_states": (p_in := ProbePatch()),
        "transformer.h_0.mlp.output": (p_out := ProbePatch()),
    }):
        assert torch.equal(_run(pg, inputs), expected)
    assert torch.equal(p_in.activation, seen["in"])
    assert torch.equal(p_out.activation, seen["out"])


def test_zero_module_input_reaches_submodule(gpt2):
    model, inputs, pg, expected = gpt2
    with pg.patch({
        "transformer.h_0.mlp.hidden_states": ZeroPatch(),
        "transformer.h_0.mlp.c_fc.x": (probe := ProbePatch()),
        "transformer.h_0.mlp.c_fc.output": (fc_out := ProbePatch()),
    }):
        out = _run(pg, inputs)
    assert not torch.equal(out, expected)
    assert torch.count_nonzero(probe.activation) == 0
    bias = model.transformer.h[0].mlp.c_fc.bias.detach()
    assert torch.equal(fc_out.activation, bias.expand_as(fc_out.activation))


def test_replace_root_input_leaves_caller_tensor_untouched(gpt2):
    model, inputs, pg, expected = gpt2
    other = token_inputs(seed=7)
    ids = inputs["input_ids"]
    before = ids.clone()
    with pg.patch({"input_ids": ReplacePatch(value=other["input_ids"])}):
        out = _run(pg, inputs)
    with torch.no_grad():
        assert torch.equal(out, model(**other).logits)
    assert torch.equal(ids, before)


def test_zero_module_output_changes_result(gpt2):
    model, inputs, pg, expected = gpt2
    with pg.patch({"transformer.h_1.output": ZeroPatch(), "transformer.ln_f.input_": (probe := ProbePatch())}):
        out = _run(pg, inputs)
    assert torch.count_nonzero(probe.activation) == 0
    assert not torch.equal(out, expected)


def test_output_logits_subpath(gpt2):
    model, inputs, pg, expected = gpt2
    with pg.patch({"output|logits": [probe := ProbePatch(), ZeroPatch()]}):
        out = pg(**inputs)
    assert torch.equal(probe.activation, expected)
    assert torch.count_nonzero(out.logits) == 0
    assert torch.equal(_run(pg, inputs), expected)


def test_tuple_subpath(gpt2):
    model, inputs, pg, expected = gpt2
    with pg.patch({
        "transformer.h_0.attn.output|sub_0": (probe := ProbePatch()),
        "transformer.h_0.attn.split|sub_2": (value := ProbePatch()),
    }):
        assert torch.equal(_run(pg, inputs), expected)
    assert probe.activation.shape == (2, 8, 32)
    assert value.activation.shape == (2, 8, 32)


def test_bad_subpath_raises_at_patch(gpt2):
    # the recorded structure of the output is checked when the patch is given (as graphpatch
    # does), not when the graph runs; the error names the parts there are
    _, inputs, pg, expected = gpt2
    with pytest.raises(NodePathError, match="logits"):
        with pg.patch({"output|nope": ProbePatch()}):
            _run(pg, inputs)
    assert torch.equal(_run(pg, inputs), expected)


# -- non-tensor values -----------------------------------------------------------------------------


def test_int_size_nodes(gpt2):
    _, inputs, pg, expected = gpt2
    assert pg.graph.transformer.h_0.mlp.c_fc.size._shape == "int"
    seen = []
    with pg.patch({
        "transformer.h_0.mlp.c_fc.size": CustomPatch(custom_op=lambda v: (seen.append(("size", v)), v)[1]),
        "transformer.h_0.mlp.c_fc.size_1": [probe := ProbePatch(), RecordPatch()],
    }):
        assert torch.equal(_run(pg, inputs), expected)
    assert seen == [("size", 2)]
    assert probe.activation == 8 and isinstance(probe.activation, int)
    with pg.patch({"transformer.h_0.mlp.c_fc.size_1": AddPatch(value=1)}):
        with pytest.raises(RuntimeError):  # view to [2, 9, 128] cannot fit 16 rows
            _run(pg, inputs)
    assert torch.equal(_run(pg, inputs), expected)


# -- order and nesting -----------------------------------------------------------------------------


def test_patch_order_within_list(gpt2):
    _, inputs, pg, _ = gpt2
    with pg.patch({MUL3: [ZeroPatch(), AddPatch(value=1.0), a := ProbePatch()]}):
        _run(pg, inputs)
    with pg.patch({MUL3: [AddPatch(value=1.0), ZeroPatch(), b := ProbePatch()]}):
        _run(pg, inputs)
    assert torch.equal(a.activation, torch.ones_like(a.activation))
    assert torch.count_nonzero(b.activation) == 0
    log = []
    with pg.patch({MUL3: [_recorder(log, i) for i in range(5)]}):
        _run(pg, inputs)
    assert log == [0, 1, 2, 3, 4]


def test_nested_contexts_compose_outer_first_and_restore(gpt2):
    _, inputs, pg, expected = gpt2
    log = []
    with pg.patch({MUL3: [_recorder(log, "o1"), ZeroPatch(), outer := RecordPatch()]}):
        zeroed = _run(pg, inputs)
        assert log == ["o1"]
        log.clear()
        with pg.patch({MUL3: [_recorder(log, "i1"), AddPatch(value=2.0), inner := ProbePatch()],
                       "transformer.h_1.mlp.output": _recorder(log, "other")}):
            _run(pg, inputs)
        assert log == ["o1", "i1", "other"]
        assert torch.equal(inner.activation, torch.full_like(inner.activation, 2.0))  # zero ran first
        log.clear()
        assert torch.equal(_run(pg, inputs), zeroed)  # inner removed, outer still active
        assert log == ["o1"]
    assert len(outer.activations) == 3
    log.clear()
    assert torch.equal(_run(pg, inputs), expected)
    assert log == []


def test_exception_in_body_restores(gpt2):
    _, inputs, pg, expected = gpt2
    with pytest.raises(ValueError, match="boom"):
        with pg.patch({MUL3: ZeroPatch()}):
            with pg.patch({"transformer.h_1.output": ZeroPatch()}):
                raise ValueError("boom")
    assert torch.equal(_run(pg, inputs), expected)


def test_exception_in_forward_restores(gpt2):
    _, inputs, pg, expected = gpt2
    with pg.patch({"transformer.h_1.output": AddPatch(value=1.0)}):
        outer_only = _run(pg, inputs)
        with pytest.raises(PatchError):
            with pg.patch({MUL3: ZeroPatch(slice=(0, 99))}):
                _run(pg, inputs)
        assert torch.equal(_run(pg, inputs), outer_only)
    assert torch.equal(_run(pg, inputs), expected)


def test_failed_inner_context_keeps_outer(gpt2):
    _, inputs, pg, expected = gpt2
    with pg.patch({MUL3: ZeroPatch()}):
        zeroed = _run(pg, inputs)
        with pytest.raises(NodePathError):
            with pg.patch({"transformer.h_0.mlp.act.nope": ZeroPatch()}):
                pass
        assert torch.equal(_run(pg, inputs), zeroed)
    assert torch.equal(_run(pg, inputs), expected)


# -- keys -------------------------------------------------------------------------------------------


def test_nodepath_and_string_keys_are_equivalent(gpt2):
    _, inputs, pg, expected = gpt2
    node = pg.graph.transformer.h_0.mlp.act.mul_3
    assert isinstance(node, NodePath) and str(node) == MUL3
    with pg.patch({node: [a := ProbePatch(), ZeroPatch()]}):
        out_np = _run(pg, inputs)
    with pg.patch({MUL3: [b := ProbePatch(), ZeroPatch()]}):
        out_str = _run(pg, inputs)
    with pg.patch({pg.graph["transformer.h_0.mlp"].act.mul_3: ZeroPatch()}):
        out_item = _run(pg, inputs)
    assert torch.equal(out_np, out_str) and torch.equal(out_np, out_item)
    assert not torch.equal(out_np, expected)
    assert torch.equal(a.activation, b.activation)


def test_user_patch_subclass_in_graph(gpt2):
    _, inputs, pg, _ = gpt2

    @dataclass(kw_only=True)
    class ScalePatch(Patch):
        factor: float

        def apply(self, value):
            return value * self.factor

    with pg.patch({MUL3: [before := ProbePatch(), ScalePatch(factor=3.0), after := ProbePatch()]}):
        _run(pg, inputs)
    assert torch.equal(after.activation, before.activation * 3.0)


# -- validation before running ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_key,bad_value,exc",
    [
        ("transformer.h_0.mlp.act.mull_3", ZeroPatch(), NodePathError),
        ("transformer.h_0.mlp", ZeroPatch(), NotAValueError),
        ("transformer.h_1.mlp.output", "zero", TypeError),
        ("transformer.h_1.mlp.output", [ZeroPatch(), 3], TypeError),
        (3, ZeroPatch(), TypeError),
    ],
    ids=["unknown", "module", "non_patch", "non_patch_in_list", "non_str_key"],
)
def test_all_entries_validated_before_any_forward(gpt2, bad_key, bad_value, exc):
    _, inputs, pg, expected = gpt2
    log = []
    with pytest.raises(exc):
        with pg.patch({MUL3: [_recorder(log, "first"), ZeroPatch()], bad_key: bad_value}):
            _run(pg, inputs)
    assert torch.equal(_run(pg, inputs), expected)
    assert log == []  # the first key's patch was never installed


# -- errors -----------------------------------------------------------------------------------------


def test_unknown_path_error(gpt2):
    _, inputs, pg, _ = gpt2
    with pytest.raises(NodePathError) as info:
        with pg.patch({"transformer.h_0.mlp.act.mul_33": ZeroPatch()}):
            pass
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, GraphPatchCacheError)
    assert err.node_path == "transformer.h_0.mlp.act.mul_33"
    assert err.suggestions[0] == MUL3
    assert MUL3 in str(err)
    with pytest.raises(NodePathError) as info2:
        pg.graph["transformer.h_0.mlpp.act.mul_3"]
    assert MUL3 in info2.value.suggestions
    with pytest.raises(KeyError):
        pg.graph["no.such.thing"]


def test_module_path_error_lists_children(gpt2):
    _, _, pg, _ = gpt2
    with pytest.raises(NotAValueError) as info:
        with pg.patch({"transformer.h_0.mlp": ZeroPatch()}):
            pass
    err = info.value
    assert isinstance(err, NodePathError) and isinstance(err, GraphPatchCacheError)
    for child in ("hidden_states", "c_fc", "act", "c_proj", "output"):
        assert child in str(err)
    assert "transformer.h_0.mlp.c_fc" in err.suggestions


@pytest.mark.parametrize("patch_map", [[(MUL3, ZeroPatch())], MUL3, None])
def test_non_dict_raises_type_error(gpt2, patch_map):
    _, _, pg, _ = gpt2
    with pytest.raises(TypeError, match="dict"):
        with pg.patch(patch_map):
            pass


def test_non_patch_value_raises_type_error(gpt2):
    _, _, pg, _ = gpt2
    with pytest.raises(TypeError, match="Patch"):
        with pg.patch({MUL3: torch.zeros(3)}):
            pass
    with pytest.raises(TypeError, match="Patch"):
        with pg.patch({MUL3: ZeroPatch}):  # the class, not an instance
            pass


@pytest.mark.parametrize(
    "patch,slice_text",
    [
        (ZeroPatch(slice=(slice(None), 100)), "100"),
        (AddPatch(value=torch.ones(5), slice=(0, 0)), "(0, 0)"),
        (ReplacePatch(value=torch.ones(3, 3), slice=(0, slice(None), slice(0, 3))), "slice(0, 3"),
    ],
    ids=["index_oob", "add_shape", "replace_shape"],
)
def test_slice_that_does_not_fit(gpt2, patch, slice_text):
    _, inputs, pg, expected = gpt2
    with pytest.raises(PatchError) as info:
        with pg.patch({MUL3: patch}):
            _run(pg, inputs)
    err = info.value
    assert isinstance(err, GraphPatchCacheError)
    assert err.node_path == MUL3
    text = str(err)
    assert MUL3 in text and slice_text in text and "(2, 8, 128)" in text
    assert torch.equal(_run(pg, inputs), expected)


def test_a_patch_that_changes_the_dtype_is_refused_naming_node_patch_and_dtypes(gpt2):
    # a float64 result on a float32 node made the next op (layer_norm, a matmul) raise a bare
    # "mixed dtype" RuntimeError naming neither node nor patch: refused at the patched call
    _, inputs, pg, expected = gpt2
    node = "transformer.h_0.ln_1.input"
    with pytest.raises(PatchError) as info:
        with pg.patch({node: CustomPatch(custom_op=lambda v: v.double())}):
            _run(pg, inputs)
    text = str(info.value)
    assert info.value.node_path == "transformer.h_0.ln_1.input_"
    assert "CustomPatch" in text and "transformer.h_0.ln_1.input_" in text
    assert "torch.float32" in text and "torch.float64" in text and "value.to(torch.float32)" in text
    assert "mixed dtype" in text  # says which bare error it stands for
    # AddPatch of a float64 value casts the sum back to the node's float32, as graphpatch's
    # in-place add does: the same logits as the model with that float32 sum added by a hook
    delta = torch.full((32,), 0.25, dtype=torch.float64)
    model = gpt2[0]
    hook = model.transformer.h[0].ln_1.register_forward_pre_hook(lambda m, a: (a[0] + delta.float(),))
    try:
        with torch.no_grad():
            want = model(**inputs).logits
    finally:
        hook.remove()
    with pg.patch({node: AddPatch(value=delta)}):
        got = _run(pg, inputs)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(_run(pg, inputs), expected)


def test_add_patch_refuses_what_the_node_cannot_hold_or_another_device(gpt2):
    _, inputs, pg, _ = gpt2
    with pytest.raises(PatchError, match=r"float value to a torch.int64 node.*\n.*value.to\(torch.int64\)"):
        with pg.patch({"input_ids": AddPatch(value=0.5)}):
            _run(pg, inputs)
    with pytest.raises(PatchError, match=r"on meta, the node's value on cpu.*\n.*value.to\('cpu'\)") as info:
        with pg.patch({MUL3: AddPatch(value=torch.ones(128, device="meta"))}):
            _run(pg, inputs)
    assert info.value.node_path == MUL3
    with pytest.raises(PatchError, match="moved its value from cpu to meta"):
        with pg.patch({MUL3: CustomPatch(custom_op=lambda v: v.to("meta"))}):
            _run(pg, inputs)


def test_errors_pickle(gpt2):
    _, _, pg, _ = gpt2
    with pytest.raises(NodePathError) as info:
        pg.graph["transformer.h_0.mlp.act.mul_33"]
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is NodePathError
    assert clone.suggestions == info.value.suggestions and str(clone) == str(info.value)


# -- autograd ---------------------------------------------------------------------------------------


def test_optimize_add_patch_delta(gpt2):
    _, inputs, pg, _ = gpt2
    torch.manual_seed(0)
    delta = torch.zeros(32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.05)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        with pg.patch({"transformer.h_1.output": AddPatch(value=delta)}):
            logits = pg(**inputs).logits
        loss = -torch.log_softmax(logits[:, -1], -1)[:, 5].mean()
        loss.backward()
        losses.append(loss.item())
        assert delta.grad is not None and delta.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < losses[0]


def test_gradient_through_slice_and_replace(gpt2):
    _, inputs, pg, _ = gpt2
    delta = torch.zeros(128, requires_grad=True)
    value = torch.zeros(2, 128, requires_grad=True)
    with pg.patch({MUL3: [AddPatch(value=delta, slice=(slice(None), -1)),
                          ReplacePatch(value=value, slice=(slice(None), 0))]}):
        pg(**inputs).logits.sum().backward()
    assert delta.grad.abs().sum() > 0 and value.grad.abs().sum() > 0


def test_gradients_equal_model(gpt2):
    model, inputs, pg, _ = gpt2

    def grads(fn):
        for p in model.parameters():
            p.grad = None
        fn(**inputs).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_model = grads(model)
    g_pg = grads(pg)
    assert g_model.keys() == g_pg.keys() and len(g_model) == len(list(model.parameters()))
    for name in g_model:
        assert torch.equal(g_model[name], g_pg[name]), name


def test_gradient_reaches_weight_through_parameter_patch(gpt2):
    model, inputs, pg, _ = gpt2
    weight = model.transformer.h[0].mlp.c_fc.weight
    with pg.patch({"transformer.h_0.mlp.c_fc.weight": AddPatch(value=0.1, slice=0)}):
        pg(**inputs).logits.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# -- NodePath ---------------------------------------------------------------------------------------


def test_nodepath_access(gpt2):
    _, _, pg, _ = gpt2
    mlp = pg.graph.transformer.h_0.mlp
    assert str(mlp) == "transformer.h_0.mlp"
    assert pg.graph["transformer.h_0.mlp"] == mlp
    assert pg.graph.transformer["h_0.mlp"] == mlp
    assert pg.graph[mlp] == mlp
    assert {str(c) for c in mlp} >= {"transformer.h_0.mlp.c_fc", "transformer.h_0.mlp.output"}
    names = dir(mlp)
    for name in ("hidden_states", "c_fc", "act", "c_proj", "dropout", "output", "_code", "_shape"):
        assert name in names
    assert "mul_3" in dir(mlp.act)
    assert not hasattr(mlp, "nonexistent")
    with pytest.raises(AttributeError, match="c_fc"):
        mlp.c_fcc


def test_nodepath_repr_tree_with_shapes(gpt2):
    _, _, pg, _ = gpt2
    text = repr(pg.graph.transformer.h_0.mlp)
    lines = text.splitlines()
    assert lines[0] == "mlp: GPT2MLP"
    assert any(re.search(r"^[│ ]*[├└]─mul_3: Tensor\(float32\)\[\w+, \w+, 128\]$", ln) for ln in lines)
    assert any(re.search(r"[├└]─weight: Tensor\(float32\)\[32, 128\]$", ln) for ln in lines)
    assert any(ln.endswith("size: int") for ln in lines)
    full = repr(pg.graph)
    assert full.splitlines()[0] == "<root>: GPT2LMHeadModel"
    assert "h_1: GPT2Block" in full
    assert re.search(r"output: CausalLMOutputWithCrossAttentions\(logits=Tensor\(float32\)", full)


def test_nodepath_code_and_shape(gpt2):
    _, inputs, pg, _ = gpt2
    act = pg.graph.transformer.h_0.mlp.act
    for name in ("mul_3", "tanh", "pow_1", "add_1"):
        assert re.search(rf"\b{name}\b", act._code)
    assert "def forward" in act._code
    mlp_code = pg.graph.transformer.h_0.mlp._code
    assert "self.c_fc(" in mlp_code and "self.act(" in mlp_code
    shape = act.mul_3._shape
    assert len(shape) == 3 and shape[2] == 128
    assert all(isinstance(d, str) for d in shape[:2])  # symbolic batch and sequence
    assert pg.graph.transformer.h_0.mlp.c_fc.weight._shape == (32, 128)
    assert pg.graph.transformer.h_0.mlp._shape is None
    assert isinstance(act.mul_3._code, str)


def test_nodepath_value_source_line(gpt2):
    _, _, pg, _ = gpt2
    source = pg.graph.transformer.h_0.mlp.act.tanh._code
    assert "tanh" in source
    assert not re.fullmatch(r"[\s^~]*", source)


# -- call signatures and variants ------------------------------------------------------------------


@pytest.mark.parametrize("batch,seq", [(3, 5), (4, 16), (2, 2)])
def test_other_batch_and_seq_lengths_are_exact(gpt2, batch, seq):
    model, _, pg, _ = gpt2
    inputs = token_inputs(batch, seq, seed=batch * 100 + seq)
    with torch.no_grad():
        assert torch.equal(pg(**inputs).logits, model(**inputs).logits)
    with pg.patch({MUL3: (probe := ProbePatch())}):
        _run(pg, inputs)
    assert probe.activation.shape == (batch, seq, 128)
    assert len(pg.variants) == 1


def test_positional_call_is_same_signature(gpt2):
    _, inputs, pg, expected = gpt2
    with torch.no_grad():
        assert torch.equal(pg(inputs["input_ids"], use_cache=False).logits, expected)
    assert len(pg.variants) == 1


def _int32(inputs):
    return {**inputs, "input_ids": inputs["input_ids"].to(torch.int32)}


@pytest.mark.parametrize(
    "make",
    [
        lambda: token_inputs(2, 8, mask=True),
        lambda: _int32(token_inputs(2, 8)),
    ],
    ids=["attention_mask", "int32"],
)
def test_other_signature_gets_exact_variant(gpt2_variants, make):
    model, _, pg = gpt2_variants
    inputs = make()
    n = len(pg.variants)
    with torch.no_grad():
        out = pg(**inputs).logits
        assert torch.equal(out, model(**inputs).logits)
    assert len(pg.variants) == n + 1
    other = make()
    if other["input_ids"].shape[0] > 1:  # the new variant is shape-generic too
        other = {**other, "input_ids": torch.randint(0, 128, (3, 5), dtype=other["input_ids"].dtype)}
        if "attention_mask" in other:
            other["attention_mask"] = torch.tensor([[1] * 5, [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        assert torch.equal(pg(**other).logits, model(**other).logits)
    assert len(pg.variants) == n + 1


def test_batch_one_shares_the_variant_of_larger_batches(gpt2_variants):
    model, _, pg = gpt2_variants
    inputs = token_inputs(1, 8, seed=3)
    n = len(pg.variants)
    with torch.no_grad():
        assert torch.equal(pg(**inputs).logits, model(**inputs).logits)
    assert len(pg.variants) == n


def test_new_variant_extracted_inside_patch_context(gpt2_variants):
    model, inputs, pg = gpt2_variants
    call = token_inputs(2, 1, seed=11)  # sequence length 1 is specialized: its own variant
    n = len(pg.variants)
    with pg.patch({MUL3: (probe := ProbePatch())}):
        out = _run(pg, call)
    assert len(pg.variants) == n + 1
    assert probe.activation is not None and probe.activation.shape == (2, 1, 128)
    with torch.no_grad():
        assert torch.equal(out, model(**call).logits)
    with pg.patch({MUL3: ZeroPatch()}):
        assert not torch.equal(_run(pg, call), out)
    assert torch.equal(_run(pg, call), out)


def test_use_cache_variant_is_exact(gpt2_variants):
    model, inputs, pg = gpt2_variants
    call = {**inputs, "use_cache": True}
    n = len(pg.variants)
    with torch.no_grad():
        out = pg(**call)
        ref = model(**call)
    assert len(pg.variants) == n + 1
    assert torch.equal(out.logits, ref.logits)
    assert len(out.past_key_values.layers) == len(ref.past_key_values.layers)
    for a, b in zip(out.past_key_values.layers, ref.past_key_values.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_patch_applies_to_every_variant(gpt2_variants):
    model, inputs, pg = gpt2_variants
    masked = token_inputs(2, 8, mask=True)
    with torch.no_grad():
        pg(**masked)  # make sure the variant exists
    with pg.patch({MUL3: [a := ProbePatch(), ZeroPatch()]}):
        out_masked = _run(pg, masked)
        out_plain = _run(pg, inputs)
    assert a.activation.shape == (2, 8, 128)
    assert not torch.equal(out_masked, model(**masked).logits.detach())
    torch.testing.assert_close(out_masked, out_plain)  # an all-ones mask changes nothing


def test_unsupported_signature_raises(gpt2_variants):
    model, inputs, pg = gpt2_variants
    rank1 = {**inputs, "input_ids": inputs["input_ids"][0]}
    n = len(pg.variants)
    with pytest.raises(SignatureMismatchError) as info:
        pg(**rank1)
    assert isinstance(info.value, GraphPatchCacheError)
    assert "input_ids" in str(info.value)
    assert len(pg.variants) == n
    with pytest.raises(Exception):  # the model itself rejects a rank-1 input_ids
        model(**rank1)


def test_patch_node_missing_from_other_variant(gpt2_variants):
    model, inputs, pg = gpt2_variants
    with torch.no_grad():
        pg(**token_inputs(2, 8, mask=True))
    assert len(pg.variants) >= 2
    node = "transformer.eq"  # only in the graph of the example call (no attention_mask)
    assert pg.graph[node]._shape is not None
    with pg.patch({node: (probe := ProbePatch())}):
        _run(pg, inputs)
        # the masked call's graph has no such node: refusing beats silently not patching
        with pytest.raises(NodePathError, match="transformer.eq"):
            _run(pg, token_inputs(2, 8, mask=True))
    assert probe.activation is not None
