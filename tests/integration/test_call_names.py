"""Module calls are named by the attribute path the calling code used (issue 10, bug 1).

Oracles: the values the plain model computes (forward hooks are not needed: every expected
value is recomputed by hand from the model's own submodules with ``torch.nn.functional``),
and the model's own parameters, which no patch may change.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from call_name_modules import D, Aliased, Containers, SharedList, SharedSequential, IndexedList, Repeated, Mixed, Inner, ChildThroughAlias, ParameterNamedLikeACall, ThroughGlobalAndList
from graphpatch_cache import (
    CacheStore,
    ExtractionOptions,
    PatchableGraph,
    ProbePatch,
    ReplacePatch,
    ZeroPatch,
    load_cached,
)
from graphpatch_cache.extraction import extract, naming

B0, B1 = 3, 5  # example batch size and another one (never 1: dynamo specializes size 1)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def lin(module, x):
    """``module(x)`` recomputed from its weight and bias (a Linear)."""
    return F.linear(x, module.weight, module.bias).detach()


def calls(graph, prefix=""):
    """``{graph path: module path}`` of every call graph below the root of an artifact."""
    out = {}
    for child in graph.children:
        path = f"{prefix}.{child.name}" if prefix else child.name
        out[path] = child.module_path
        out.update(calls(child, path))
    return out


def probe(pg, x, *paths):
    probes = {p: ProbePatch() for p in paths}
    with pg.patch(probes):
        pg(x)
    return [probes[p].activation for p in paths]


def frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


























# -- the reproduction ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aliased():
    model = make(Aliased)
    return model, PatchableGraph(model, rand(B0, D))


def test_aliased_names_follow_the_attribute_used(aliased):
    model, pg = aliased
    assert calls(pg.artifact.root) == {"b": "b", "a": "a"}
    # the graph of the first call is named after `self.b`, the second after `self.a`
    assert [c.name for c in pg.artifact.root.children] == ["b", "a"]
    assert pg.artifact.root.children[0].attributes["weight"] == "b.weight"
    assert pg.artifact.root.children[1].attributes["weight"] == "a.weight"
    x = rand(B1, D, seed=1)
    b_in, a_in = probe(pg, x, "b.input_", "a.input_")
    assert torch.equal(b_in, x)
    assert torch.equal(a_in, x + 1)


def test_aliased_patch_hits_the_named_call(aliased):
    model, pg = aliased
    x = rand(B1, D, seed=1)
    before = frozen(model)
    with pg.patch({"b.output": ZeroPatch()}):
        out = pg(x)
    assert torch.equal(out, lin(model.a, x + 1))
    value = rand(B1, D, seed=7)
    with pg.patch({"a.output": ReplacePatch(value=value)}):
        out = pg(x)
    assert torch.equal(out, lin(model.a, x) * 2 + value)
    # a weight patch applies to the one call's use of the shared weight
    with pg.patch({"b.weight": ZeroPatch()}):
        out = pg(x)
    assert torch.equal(out, model.a.bias.detach().expand(B1, D) * 2 + lin(model.a, x + 1))
    assert unchanged(model, before)


# -- containers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def containers():
    model = make(Containers)
    # md.bar.baz.0 and .1 are never called: they only make index 2 a nested-container entry
    return model, PatchableGraph(model, ExtractionOptions(allow_unused_submodules=True), rand(B0, D))


def test_container_names(containers):
    model, pg = containers
    assert calls(pg.artifact.root) == {
        "md_bar_baz_2": "md.bar.baz.2", "seq": "seq", "seq.sub_0": "seq.0", "seq.sub_1": "seq.1", "lin": "lin",
    }
    x = rand(B1, D, seed=2)
    inner, seq_in, lin_in = probe(pg, x, "md_bar_baz_2.input_", "seq.sub_0.input_", "lin.input_")
    y = lin(model.lin, x)
    assert torch.equal(inner, x)
    assert torch.equal(seq_in, y)
    assert torch.equal(lin_in, x)


def test_container_patches_hit_the_named_call(containers):
    model, pg = containers
    x = rand(B1, D, seed=2)
    y = lin(model.lin, x)
    bias = model.lin.bias.detach().expand(B1, D)
    with pg.patch({"seq.sub_0.output": ZeroPatch()}):  # the Sequential's call only
        assert torch.equal(pg(x), torch.relu(torch.zeros(B1, D)) + y)
    with pg.patch({"md_bar_baz_2.output": ZeroPatch()}):  # the nested-container call only
        assert torch.equal(pg(x), torch.relu(bias) + y)
    with pg.patch({"seq.output": ZeroPatch()}):
        assert torch.equal(pg(x), y)
    value = rand(B1, D, seed=8)
    with pg.patch({"lin.output": ReplacePatch(value=value)}):
        assert torch.equal(pg(x), torch.relu(lin(model.lin, y)) + value)
    with pg.patch({"seq.sub_0.weight": ZeroPatch()}):
        assert torch.equal(pg(x), torch.relu(bias) + y)


def test_shared_module_list_entries():
    model = make(SharedList)
    pg = PatchableGraph(model, rand(B0, D))
    assert calls(pg.artifact.root) == {"layers_0": "layers.0", "layers_1": "layers.1", "layers_2": "layers.2"}
    x = rand(B1, D, seed=3)
    h0 = torch.tanh(lin(model.layers[0], x))
    h1 = torch.tanh(lin(model.layers[1], h0))
    (third_in,) = probe(pg, x, "layers_2.input_")
    assert torch.equal(third_in, h1)
    with pg.patch({"layers_2.output": ZeroPatch()}):
        assert torch.equal(pg(x), torch.zeros(B1, D))
    with pg.patch({"layers_0.output": ZeroPatch()}):
        expected = torch.tanh(lin(model.layers[2], torch.tanh(lin(model.layers[1], torch.zeros(B1, D)))))
        assert torch.equal(pg(x), expected)


def test_shared_sequential_entries():
    model = make(SharedSequential)
    pg = PatchableGraph(model, rand(B0, D))
    assert calls(pg.artifact.root) == {"seq": "seq", "seq.sub_0": "seq.0", "seq.sub_1": "seq.1", "seq.sub_2": "seq.2",
                                       "head": "head"}
    x = rand(B1, D, seed=12)
    shared = model.head
    h = torch.tanh(lin(shared, x))
    ins = probe(pg, x, "seq.sub_0.input_", "seq.sub_2.input_", "head.input_")
    assert all(torch.equal(i, e) for i, e in zip(ins, [x, h, lin(shared, h)]))
    value = rand(B1, D, seed=13)
    with pg.patch({"seq.sub_2.output": ReplacePatch(value=value)}):
        assert torch.equal(pg(x), lin(shared, value))
    with pg.patch({"head.weight": ZeroPatch()}):
        assert torch.equal(pg(x), shared.bias.detach().expand(B1, D))
    with pg.patch({"seq.sub_0.weight": ZeroPatch()}):
        assert torch.equal(pg(x), lin(shared, lin(shared, torch.tanh(shared.bias.detach().expand(B1, D)))))


def test_constant_and_negative_indices():
    model = make(IndexedList)
    pg = PatchableGraph(model, rand(B0, D))
    assert [c.name for c in pg.artifact.root.children] == ["layers_0", "layers_2", "layers_1"]
    assert calls(pg.artifact.root) == {"layers_0": "layers.0", "layers_2": "layers.2", "layers_1": "layers.1"}
    x = rand(B1, D, seed=14)
    shared = model.layers[0]
    (last_in,) = probe(pg, x, "layers_2.input_")
    assert torch.equal(last_in, lin(shared, x))
    with pg.patch({"layers_0.output": ZeroPatch()}):
        assert torch.equal(pg(x), shared.bias.detach().expand(B1, D) + lin(model.layers[1], x))


# -- repeated calls -----------------------------------------------------------------------------------------
def test_repeated_calls_through_one_path():
    model = make(Repeated)
    before = frozen(model)
    pg = PatchableGraph(model, rand(B0, D))
    assert calls(pg.artifact.root) == {"a_0": "a", "a_1": "a", "a_2": "a"}
    x = rand(B1, D, seed=4)
    x1 = lin(model.a, x)
    x2 = lin(model.a, x1)
    ins = probe(pg, x, "a_0.input_", "a_1.input_", "a_2.input_")
    assert all(torch.equal(i, e) for i, e in zip(ins, [x, x1, x2]))
    bias = model.a.bias.detach().expand(B1, D)
    with pg.patch({"a_1.output": ZeroPatch()}):
        assert torch.equal(pg(x), bias)
    # graphpatch's MultiplyInvokedModule semantics: `a_0.weight` is the first call's use only
    with pg.patch({"a_0.weight": ZeroPatch()}):
        assert torch.equal(pg(x), lin(model.a, lin(model.a, bias)))
    with pg.patch({"a_2.weight": ZeroPatch()}):
        assert torch.equal(pg(x), bias)
    assert unchanged(model, before)


def test_mixed_aliases_and_repeats():
    model = make(Mixed)
    pg = PatchableGraph(model, rand(B0, D))
    assert [c.name for c in pg.artifact.root.children] == ["b_0", "a_0", "a_1", "b_1"]
    assert calls(pg.artifact.root) == {"b_0": "b", "a_0": "a", "a_1": "a", "b_1": "b"}
    x = rand(B1, D, seed=5)
    p = lin(model.a, x)
    q = lin(model.a, p)
    r = lin(model.a, x * 3)
    ins = probe(pg, x, "b_0.input_", "a_0.input_", "a_1.input_", "b_1.input_")
    assert all(torch.equal(i, e) for i, e in zip(ins, [x, p, x * 3, q + r]))
    value = rand(B1, D, seed=9)
    with pg.patch({"a_1.output": ReplacePatch(value=value)}):
        assert torch.equal(pg(x), lin(model.a, q + value))
    with pg.patch({"b_0.output": ZeroPatch()}):
        assert torch.equal(pg(x), lin(model.a, lin(model.a, torch.zeros(B1, D)) + r))


def test_call_inside_a_child_through_aliases():
    model = make(ChildThroughAlias)
    pg = PatchableGraph(model, rand(B0, D))
    assert calls(pg.artifact.root) == {"other": "other", "other.alias": "other.alias", "other.inner": "other.inner"}
    (child,) = pg.artifact.root.children
    assert [c.attributes["weight"] for c in child.children] == ["other.alias.weight", "other.inner.weight"]
    x = rand(B1, D, seed=6)
    alias_in, inner_in = probe(pg, x, "other.alias.input_", "other.inner.input_")
    assert torch.equal(alias_in, x)
    assert torch.equal(inner_in, x * 2)
    lin_ = model.child.inner
    with pg.patch({"other.inner.output": ZeroPatch()}):
        assert torch.equal(pg(x), lin(lin_, x) + 1)
    with pg.patch({"other.alias.weight": ZeroPatch()}):
        assert torch.equal(pg(x), lin_.bias.detach().expand(B1, D) - lin(lin_, x * 2) + 1)


def test_a_numbered_call_never_takes_a_parameter_name():
    model = make(ParameterNamedLikeACall)
    pg = PatchableGraph(model, rand(B0, D))
    assert calls(pg.artifact.root) == {"a_0_": "a", "a_1": "a"}
    x = rand(B1, D, seed=11)
    (param,) = probe(pg, x, "a_0")
    assert torch.equal(param, model.a_0)
    with pg.patch({"a_0": ZeroPatch()}):
        assert torch.equal(pg(x), lin(model.a, x * 2))
    with pg.patch({"a_0_.output": ZeroPatch()}):
        assert torch.equal(pg(x), lin(model.a, x * 2))
    with pg.patch({"a_1.input_": ZeroPatch()}):
        assert torch.equal(pg(x), lin(model.a, x) * model.a_0.detach() + model.a.bias.detach().expand(B1, D))


# -- fallback -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_calls_without_an_attribute_path_fall_back_deterministically():
    model = make(ThroughGlobalAndList)
    x0 = rand(B0, D)
    first = extract(model, (x0,))
    again = extract(model, (x0,))
    # the global call has no path from the caller: the module's first registered name, `g`;
    # the plain-list call falls back to `a`, and shares the numbering with the `self.a` call
    assert calls(first.root) == {"g": "g", "a_0": "a", "a_1": "a"}
    assert first.to_json() == again.to_json()
    pg = PatchableGraph(model, x0)
    x = rand(B1, D, seed=10)
    g_in, a0_in, a1_in = probe(pg, x, "g.input_", "a_0.input_", "a_1.input_")
    assert torch.equal(g_in, x)
    assert torch.equal(a0_in, x * 2)
    assert torch.equal(a1_in, x * 3)
    with pg.patch({"a_0.output": ZeroPatch()}):
        assert torch.equal(pg(x), lin(model.g, x) + lin(model.a, x * 3))


@pytest.mark.slow
def test_calls_inside_an_opaque_module_fall_back():
    """dynamo never sees an opaque module's code, so its calls have no source: they take the
    module's first registered name inside the caller (``inner``), numbered per caller."""
    model = make(ChildThroughAlias)
    pg = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(Inner,)), rand(B0, D))
    assert calls(pg.artifact.root) == {"other": "other", "other.inner_0": "other.inner", "other.inner_1": "other.inner"}
    assert pg.artifact.root.children[0].kind == "opaque"
    x = rand(B1, D, seed=6)
    first_in, second_in = probe(pg, x, "other.inner_0.input_", "other.inner_1.input_")
    assert torch.equal(first_in, x)  # the call through `self.alias`
    assert torch.equal(second_in, x * 2)
    with pg.patch({"other.inner_1.output": ZeroPatch()}):
        assert torch.equal(pg(x), lin(model.child.inner, x) + 1)


def test_which_calls_use_the_fallback():
    """The fallback applies exactly where the caller reached the module other than through
    its registered submodules: the global and the plain-list call, not `self.a`."""
    capture_module = importlib.import_module("graphpatch_cache.extraction.capture")
    model = make(ThroughGlobalAndList)
    cap = capture_module.capture(model, (rand(B0, D),), {}, ExtractionOptions())
    names = naming.name_calls(model, cap.recorder.calls, cap.graph)
    by_local = {names.local[i]: names.from_source[i] for i in names.local if i != 0}
    assert by_local == {"g": False, "a_0": False, "a_1": True}


# -- the cache ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cache_hit_keeps_the_names(tmp_path):
    model = make(Mixed)
    x0 = rand(B0, D)
    fresh = load_cached(model, x0, store=CacheStore(tmp_path / "root", local_dir=False))
    hit = load_cached(model, x0, store=CacheStore(tmp_path / "root", local_dir=False))
    assert (fresh.cache_stats.misses, hit.cache_stats.hits) == (1, 1)
    assert calls(hit.artifact.root) == calls(fresh.artifact.root) == {"b_0": "b", "a_0": "a", "a_1": "a", "b_1": "b"}
    assert repr(hit.graph) == repr(fresh.graph)
    x = rand(B1, D, seed=5)
    (b1_in,) = probe(hit, x, "b_1.input_")
    assert torch.equal(b1_in, lin(model.a, lin(model.a, x)) + lin(model.a, x * 3))
