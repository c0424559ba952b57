"""pg.record: many values in one call, checked against forward hooks on the plain model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphpatch_cache import NodePathError, NotAValueError, PatchableGraph, ProbePatch, ZeroPatch
from graphpatch_cache.runtime.bind import ModuleGraphModule
from tiny_models import WritesInPlace, tiny_llama, token_inputs


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(n_layer=3).eval()
    inputs = {**token_inputs(batch=2, seq=7), "use_cache": False}
    return model, inputs, PatchableGraph(model, **inputs)


def _module_name(graph_path: str) -> str:
    """``model.layers_1.mlp`` -> ``model.layers.1.mlp`` (graph paths suffix a call index)."""
    parts = []
    for part in graph_path.split("."):
        head, _, index = part.rpartition("_")
        parts.extend([head, index] if head and index.isdigit() and head != "sub" else [part])
    return ".".join(parts)


def _hooked_outputs(model, inputs):
    seen = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: seen.setdefault(name, out))
               for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_recorded_module_outputs_equal_what_forward_hooks_see(llama):
    model, inputs, pg = llama
    expected_out, hooked = _hooked_outputs(model, inputs)
    with torch.no_grad():
        out, acts = pg.record(**inputs, nodes="*.output")
    assert torch.equal(out.logits, expected_out.logits)
    compared = 0
    for path, value in acts.items():
        name = _module_name(path[: -len(".output")])
        assert name in hooked, (path, name)
        want = hooked[name]
        if isinstance(want, torch.Tensor):
            assert torch.equal(value, want), path
        else:  # a tuple or ModelOutput: tensor by tensor
            got = [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
            ref = [v for v in torch.utils._pytree.tree_leaves(want) if isinstance(v, torch.Tensor)]
            assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref)), path
        compared += 1
    # every module the model ran has its output recorded (the root model's own is "output")
    assert compared == len(hooked) and compared > 20


def test_a_glob_selects_in_graph_order_and_values_match_probes(llama):
    model, inputs, pg = llama
    with torch.no_grad():
        _, acts = pg.record(**inputs, nodes="model.layers_1.mlp.*")
    assert acts and all(p.startswith("model.layers_1.mlp.") for p in acts)
    assert not any(p.endswith(".weight") for p in acts)  # parameters only when named exactly
    probes = {p: ProbePatch() for p in acts}
    with torch.no_grad(), pg.patch(probes):
        pg(**inputs)
    assert list(acts) == [p for p in acts]  # (a dict in graph order)
    for path, probe in probes.items():
        assert torch.equal(acts[path], probe.activation), path


def test_exact_paths_name_parameters_parts_and_aliases(llama):
    model, inputs, pg = llama
    weight = "model.layers_0.mlp.down_proj.weight"
    with torch.no_grad():
        out, acts = pg.record(**inputs, nodes=[weight, "output|logits", "model.layers_0.mlp.down_proj.input"])
    assert list(acts) == [weight, "output|logits", "model.layers_0.mlp.down_proj.input"]
    assert acts[weight].data_ptr() == model.model.layers[0].mlp.down_proj.weight.data_ptr()  # a view, no copy
    assert not acts[weight].requires_grad
    assert torch.equal(acts["output|logits"], out.logits)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    assert torch.equal(acts["model.layers_0.mlp.down_proj.input"], seen[0])


def test_a_predicate_selects_and_values_come_after_active_patches(llama):
    model, inputs, pg = llama
    target = "model.layers_2.mlp.output"
    with torch.no_grad(), pg.patch({target: ZeroPatch()}):
        out, acts = pg.record(**inputs, nodes=lambda p: p.startswith("model.layers_2.") and p.endswith("output"))
    assert target in acts and not acts[target].any()
    assert all(p.startswith("model.layers_2.") for p in acts)
    with torch.no_grad():
        assert not torch.equal(out.logits, model(**inputs).logits)
        assert torch.equal(pg(**inputs).logits, model(**inputs).logits)  # nothing stays installed


def test_selecting_nothing_or_a_module_is_a_clear_error(llama):
    _, inputs, pg = llama
    with pytest.raises(NodePathError) as info:
        pg.record(**inputs, nodes="model.layer_1.mlp.*")
    assert "selects no value" in str(info.value) and info.value.suggestions
    with pytest.raises(NodePathError):
        pg.record(**inputs, nodes="model.layers_1.mlp.no_such_node")
    with pytest.raises(NotAValueError):
        pg.record(**inputs, nodes="model.layers_1.mlp")
    with pytest.raises(TypeError, match="nodes="):
        pg.record(**inputs, nodes=3)


def test_values_are_copies_where_the_graph_writes_in_place_and_views_where_not():
    torch.manual_seed(0)
    model = WritesInPlace().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)
    with torch.no_grad():
        out, acts = pg.record(x, nodes=["b", "lin.output", "output"])
    expected = model.lin(x)
    assert "b.mul_(" in pg._variants[0].root.code
    assert torch.equal(acts["b"], expected)  # the value the node had, not the doubled one
    assert torch.equal(acts["lin.output"], expected)
    assert acts["output"].data_ptr() != out.data_ptr()  # copies: this graph writes in place

    plain = PatchableGraph(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), x)
    with torch.no_grad():
        out, acts = plain.record(x, nodes="*")
    assert acts["output"].data_ptr() == out.data_ptr()  # no writes anywhere: the graph's own tensors


def test_recording_reuses_its_slots_and_slots_are_not_modules(llama):
    _, inputs, pg = llama
    with torch.no_grad():
        pg.record(**inputs, nodes="model.layers_0.*")
        graphs = [m for m in pg.modules() if isinstance(m, ModuleGraphModule)]
        # (a slot, or its recorder's op bound in its place where the call owns the value)
        first = {id(getattr(v, "__self__", v)) for g in graphs for k, v in vars(g).items() if k.startswith("_graphpatch_slot_")}
        pg.record(**inputs, nodes="model.layers_0.*")
        again = {id(getattr(v, "__self__", v)) for g in graphs for k, v in vars(g).items() if k.startswith("_graphpatch_slot_")}
        assert first and first == again  # the prepared slots, installed again
        with pg.patch({"model.layers_0.mlp.output": ProbePatch()}):
            assert not [n for n, _ in pg.named_modules() if "_graphpatch_slot_" in n]


def test_a_probe_subclass_with_its_own_op_is_run_as_written(llama):
    _, inputs, pg = llama

    class Doubling(ProbePatch):
        def op(self, value):
            super().op(value)
            return value * 2

    node = "model.layers_0.mlp.output"
    doubled, plain = Doubling(), ProbePatch()
    with torch.no_grad():
        with pg.patch({node: doubled}):
            patched = pg(**inputs).logits
        with pg.patch({node: plain}):
            unpatched = pg(**inputs).logits
    assert not torch.equal(patched, unpatched)
    assert torch.equal(doubled.activation, plain.activation)


def test_identical_layers_share_their_patched_code_and_keep_their_own_slots(llama):
    model, inputs, pg = llama
    graphs = {m._graphpatch_node_path: m for m in pg.modules() if isinstance(m, ModuleGraphModule)}
    layer1, layer2 = graphs["model.layers_1.mlp"], graphs["model.layers_2.mlp"]
    assert type(layer1) is not type(layer2) and type(layer1).forward is type(layer2).forward  # shared at binding
    zero, probe = ZeroPatch(), ProbePatch()
    with torch.no_grad(), pg.patch({"model.layers_1.mlp.output": zero, "model.layers_2.mlp.output": probe}):
        assert type(layer1).forward is type(layer2).forward  # one patched code for both
        assert type(layer1).forward is not type(graphs["model.layers_0.mlp"]).forward  # layer 0 is not patched
        out = pg(**inputs)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        _, hooked = _hooked_outputs(model, inputs)
        with torch.no_grad():
            expected = model(**inputs)
    finally:
        handle.remove()
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(probe.activation, hooked["model.layers.2.mlp"])


def test_node_paths_lists_what_record_records_and_variants_print_short(llama):
    model, inputs, pg = llama
    paths = pg.node_paths()
    _, acts = pg.record(**inputs)
    assert paths == list(acts) and len(paths) > 100
    assert all(pg.graph[p]._is_value for p in paths)
    mlp = pg.node_paths("model.layers_0.mlp.*")
    assert mlp and all(p.startswith("model.layers_0.mlp.") for p in mlp)
    assert pg.node_paths(lambda p: p.endswith(".output")) == [p for p in paths if p.endswith(".output")]
    text = repr(pg.variants)
    nodes = sum(len(g.nodes) for g in pg.artifact.root.walk())
    assert len(text) < 400 and "LlamaForCausalLM" in text and f"{nodes} nodes" in text
