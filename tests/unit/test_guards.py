"""runtime/guards.py: no write into a parameter, global state restored after every call."""

import torch

import pytest

from graphpatch_cache import ProtectedWriteError
from graphpatch_cache.runtime import guards


def test_a_guarded_write_into_a_parameter_or_its_view_is_refused_before_it_happens():
    model = torch.nn.Linear(3, 3)
    before = model.weight.detach().clone()
    zero = guards.guarded(guards.method_call("zero_"), [0], [], model, "lin.z", "zero_")
    add = guards.guarded(torch.Tensor.add_, [0], [], model, "lin.a", "add_")
    for value in (model.weight, model.weight.view(-1), model.weight.detach(), model.weight[1:], model.bias.unsqueeze(0)):
        with pytest.raises(ProtectedWriteError) as info:
            zero(value)
        assert info.value.node_path == "lin.z"
        with pytest.raises(ProtectedWriteError):
            add(value, 1.0)
    assert torch.equal(model.weight.detach(), before)
    mine = torch.ones(3)
    assert zero(mine) is mine and not mine.any()  # a tensor of the graph's own is written as asked


def test_written_inputs_know_in_place_forms():
    x = object()
    assert guards.written_inputs("call_method", "add_", None, [x, 1], {}) == [x]
    assert guards.written_inputs("call_method", "add", None, [x, 1], {}) == []
    assert guards.written_inputs("call_function", "_operator.iadd", None, [x, 1], {}) == [x]
    assert guards.written_inputs("call_function", "_operator.setitem", None, [x, 0, 1], {}) == [x]
    relu = torch.nn.functional.relu
    assert guards.written_inputs("call_function", "torch.nn.functional.relu", relu, [x], {"inplace": True}) == [x]
    assert guards.written_inputs("call_function", "torch.nn.functional.relu", relu, [x, True], {}) == [x]
    assert guards.written_inputs("call_function", "torch.nn.functional.relu", relu, [x], {}) == []
    emb = torch.nn.functional.embedding
    w = object()
    assert guards.written_inputs("call_function", "torch.nn.functional.embedding", emb, [x, w], {"max_norm": 1.0}) == [w]
    assert guards.written_inputs("call_function", "torch.nn.functional.embedding", emb, [x, w, 0], {}) == []
    op = torch.ops.aten.add_.Tensor
    assert guards.written_inputs("call_function", "torch.ops.aten.add_.Tensor", op, [x, w], {}) == [x]


def test_global_state_is_restored():
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    with guards.preserved_global_state():
        torch._C._set_grad_enabled(not grad)
        torch.set_default_dtype(torch.float64)
        torch.set_autocast_enabled("cpu", True)
    assert torch.get_default_dtype() == dtype and torch.is_grad_enabled() == grad
    assert not torch.is_autocast_enabled("cpu")


def test_keyword_named_operators_write_nothing():
    x, y = object(), object()
    for name in ("_operator.and_", "_operator.or_", "_operator.not_", "_operator.is_"):
        assert guards.written_inputs("call_function", name, None, [x, y], {}) == []
    assert guards.written_inputs("call_function", "_operator.iand", None, [x, y], {}) == [x]


def test_fresh_results_are_only_what_the_graph_allocated():
    class Node:  # the part of an fx node is_fresh reads
        def __init__(self, name):
            self.name = name

    fresh = set()
    assert guards.is_fresh("call_method", "new_ones", [], fresh)
    fresh.add("made")
    assert guards.is_fresh("call_function", "_operator.iand", [Node("made")], fresh)  # returns what it wrote
    assert not guards.is_fresh("call_function", "_operator.iand", [Node("weight")], fresh)
    # may return their input unchanged (no copy) although their schemas declare no alias
    for op, name in (("call_method", "type_as"), ("call_function", "torch.atleast_1d"), ("call_method", "to"),
                     ("call_method", "add_"), ("get_attr", "weight"), ("placeholder", "x")):
        assert not guards.is_fresh(op, name, [], fresh)
