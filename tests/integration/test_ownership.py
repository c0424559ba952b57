"""Probes keep the tensor itself only where the call owns it (runtime.ownership): whatever
the caller then does to the output, the inputs or the weights, every probe still holds the
value its node had; graphs that write in place, and blocks with a patch that changes values,
get copies."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from graphpatch_cache import PatchableGraph, ProbePatch, ZeroPatch
from graphpatch_cache.artifact.model import ModuleGraph, NodeData
from graphpatch_cache.runtime.ownership import owned_values
from graphpatch_cache.runtime.recording import values_of
from tiny_models import WritesInPlace, tiny_gpt2, tiny_llama, token_inputs


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _every_value(pg):
    return [str(v) for v in values_of(pg.graph)]


def _probe_everything_then_disturb(model, inputs):
    pg = PatchableGraph(model, **inputs)
    probes = {path: ProbePatch() for path in _every_value(pg)}
    with torch.no_grad():
        with pg.patch(probes):
            out = pg(**inputs)
        seen = {p: probe.activation.clone() for p, probe in probes.items() if isinstance(probe.activation, torch.Tensor)}
        weights = [p.detach().clone() for p in model.parameters()]
        out.logits.add_(1.0)  # the caller writes into everything it was handed
        for p in model.parameters():
            p.add_(1.0)
        inputs["input_ids"].add_(1)
        try:
            changed = [p for p, value in seen.items() if not torch.equal(probes[p].activation, value)]
        finally:
            inputs["input_ids"].sub_(1)
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
    return pg, probes, changed


@pytest.mark.slow
def test_probes_keep_what_their_nodes_had_whatever_the_caller_writes_after():
    for model in (tiny_llama(n_layer=2).eval(), tiny_gpt2(n_layer=2).eval()):
        inputs = {**token_inputs(batch=2, seq=6), "use_cache": False}
        pg, probes, changed = _probe_everything_then_disturb(model, inputs)
        assert not changed, changed[:5]
        # and most of them are the graph's own tensors: a node and its view share storage
        owned = pg._variants[0].installer.owned()
        assert sum(len(v) for v in owned.values()) > len(probes) // 2
    layer = "model.layers_0.self_attn"
    q, view = probes_of(tiny_llama(n_layer=1).eval(), [f"{layer}.q_proj.output", f"{layer}.view"])
    assert _storage(q.activation) == _storage(view.activation)


def probes_of(model, paths, extra=None):
    inputs = {**token_inputs(batch=1, seq=5), "use_cache": False}
    pg = PatchableGraph(model, **inputs)
    probes = {p: ProbePatch() for p in paths}
    with torch.no_grad(), pg.patch({**probes, **(extra or {})}):
        pg(**inputs)
    return [probes[p] for p in paths]


def test_a_patch_that_changes_values_makes_every_probe_copy():
    layer = "model.layers_0.self_attn"
    model = tiny_llama(n_layer=1).eval()
    q, view = probes_of(model, [f"{layer}.q_proj.output", f"{layer}.view"],
                        {"model.layers_0.mlp.output": ZeroPatch()})
    assert _storage(q.activation) != _storage(view.activation)
    assert torch.equal(q.activation.view(view.activation.shape), view.activation)


def test_parameters_inputs_and_the_output_are_never_kept():
    model = tiny_llama(n_layer=1).eval()
    inputs = {**token_inputs(batch=1, seq=5), "use_cache": False}
    pg = PatchableGraph(model, **inputs)
    weight, ids, logits = ProbePatch(), ProbePatch(), ProbePatch()
    with torch.no_grad(), pg.patch({"model.layers_0.mlp.up_proj.weight": weight, "input_ids": ids,
                                    "output|logits": logits}):
        out = pg(**inputs)
    assert _storage(weight.activation) != _storage(model.model.layers[0].mlp.up_proj.weight)
    assert _storage(ids.activation) != _storage(inputs["input_ids"])
    assert _storage(logits.activation) != _storage(out.logits)


def test_a_graph_that_writes_in_place_gets_copies():
    torch.manual_seed(0)
    model = WritesInPlace().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)
    assert pg._variants[0].installer.owned() == {}
    probe = ProbePatch()
    with torch.no_grad(), pg.patch({"b": probe}):
        pg(x)
    assert torch.equal(probe.activation, model.lin(x).detach())  # the value before the write


def _node(name, op, target, *args):
    return NodeData(name=name, op=op, target=target, args={"t": list(args)}, kwargs={"d": []})


def test_a_value_inside_a_returned_tuple_is_not_owned():
    """``(a,) + (b,)`` holds ``a`` itself (dynamo folds it in traced code; an artifact may
    hold it): only an operator whose left operand is a tensor allocates."""
    graph = ModuleGraph(name="", module_path="", module_class="M", kind="compiled", call_index=0, children=[], nodes=[
        _node("x", "placeholder", "x"),
        _node("a", "call_function", "_operator.mul", {"n": "x"}, 2),
        _node("pair", "call_function", "_operator.add", {"t": [{"n": "a"}]}, {"t": [{"n": "a"}]}),
        _node("other", "call_function", "_operator.mul", {"n": "x"}, 3),
        _node("z", "call_function", "_operator.add", {"n": "other"}, 1),
        _node("output", "output", "output", {"t": [{"n": "pair"}, {"n": "z"}]}),
    ])
    assert owned_values(graph, lambda path, name: False) == {"": frozenset({"other"})}


def test_leaving_a_block_lets_go_of_its_patches():
    model = tiny_llama(n_layer=1).eval()
    inputs = {**token_inputs(batch=1, seq=5), "use_cache": False}
    pg = PatchableGraph(model, **inputs)
    probes = {p: ProbePatch() for p in _every_value(pg)}
    refs = [weakref.ref(p) for p in probes.values()]
    with torch.no_grad(), pg.patch(probes):
        pg(**inputs)
    del probes
    gc.collect()
    assert not [r for r in refs if r() is not None]
