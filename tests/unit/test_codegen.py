"""Shared generated code (runtime/codegen.py): graphs with the same code text but other objects
behind its globals, or constants that differ only in type or sign, never share a forward.

Oracles: function identity and the values the bound graphs compute."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from graphpatch_cache.runtime.bind import ModuleGraphModule
from graphpatch_cache.runtime.codegen import SharedCode


def _graph_calling(fn) -> torch.fx.Graph:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(fn, (x,)))
    return g


def _bind_like_bind(shared: SharedCode, graph: torch.fx.Graph) -> ModuleGraphModule:
    """What runtime.bind.bind_graph does with a graph: key, attach, construct, remember."""
    key = shared.key(graph)
    shared.attach(graph, key)
    gm = ModuleGraphModule({}, graph)
    shared.remember(key, gm)
    return gm


def test_same_code_text_with_other_objects_behind_its_globals_is_not_shared():
    def closure(k):
        def write_guard(x):  # the same name for each: fx gives both the same global name
            return x + k
        return write_guard

    shared = SharedCode()
    one, two = closure(1), closure(2)
    gm1 = _bind_like_bind(shared, _graph_calling(one))
    gm2 = _bind_like_bind(shared, _graph_calling(two))
    gm1b = _bind_like_bind(shared, _graph_calling(one))
    assert gm1.code == gm2.code  # identical text ...
    assert type(gm1).forward is not type(gm2).forward  # ... but other objects: never shared
    assert type(gm1b).forward is type(gm1).forward and type(gm1b) is not type(gm1)
    x = torch.zeros(2)
    assert torch.equal(gm1(x), x + 1) and torch.equal(gm2(x), x + 2) and torch.equal(gm1b(x), x + 1)
    assert shared.hits == 1


def test_constants_differing_only_in_type_or_sign_are_not_shared():
    shared = SharedCode()

    def graph(c):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        g.output(g.call_function(torch.add, (x, c)))
        return g

    gms = [_bind_like_bind(shared, graph(c)) for c in (0.0, -0.0, 0, 2, 2.0, 2)]
    assert shared.hits == 1  # only the second 2
    assert type(gms[5]).forward is type(gms[3]).forward
    assert len({type(m).forward for m in gms}) == 5


def test_twins_need_node_data_equal_with_its_value_types():
    """``1 == True`` in Python, but ``x[1]`` and ``x[True]`` differ: a graph whose data says
    ``True`` where a template's says ``1`` is no twin of it."""
    from graphpatch_cache.artifact import ModuleGraph, NodeData

    def data(index):
        return ModuleGraph(name="m", module_path="m", module_class="x.M", kind="compiled", call_index=0, children=[],
                           nodes=[NodeData(name="x", op="placeholder", target="x"),
                                  NodeData(name="getitem", op="call_function", target="_operator.getitem",
                                           args=[{"n": "x"}, index]),
                                  NodeData(name="output", op="output", target="output", args=[{"n": "getitem"}])])

    one, true, one_again = data(1), data(True), data(1)
    assert one.nodes == true.nodes  # what dataclass equality would have said
    shared = SharedCode()
    graph = _graph_calling(lambda v: v)
    key = shared.key(graph)
    gm = ModuleGraphModule({}, graph)
    shared.remember(key, gm, one, None, reusable=True)
    assert shared.twin_of(true, None) is None
    assert shared.twin_of(one_again, None) == key
    assert shared.twin_of(one_again, torch.device("cpu")) is None  # another device: no twin either


def test_node_data_that_refers_to_itself_is_never_a_twin():
    from graphpatch_cache.artifact import ModuleGraph, NodeData
    from graphpatch_cache.runtime.codegen import SharedCode

    loop = {"t": []}
    loop["t"].append(loop)
    data = ModuleGraph(name="", module_path="", module_class="m.M", kind="compiled", call_index=0, children=[],
                       nodes=[NodeData(name="x", op="placeholder", target="x", args=loop, kwargs={"d": []}, meta={})])
    with pytest.raises(ValueError, match="refers to itself"):
        data.nodes_key()
    assert SharedCode().twin_of(data, None) is None
