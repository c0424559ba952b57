"""Extraction and patching on small model structures, each checked against an independent
oracle: the unwrapped module's own output (``torch.equal``), forward hooks on the original
submodules, values computed by hand with ``torch.nn.functional``, and parameter identity.

The fixture modules live in ``structure_modules.py``.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import structure_modules as sm
from graphpatch_cache import (
    AddPatch,
    ExtractionError,
    ExtractionOptions,
    PatchableGraph,
    ProbePatch,
    OpaqueModuleWarning,
    ReplacePatch,
    UnusedSubmoduleError,
    ZeroPatch,
)

pytestmark = pytest.mark.slow  # its module fixtures extract about 15 small models, 0.6-6 s each here

B0, B1 = 3, 5  # example batch size, and another one (never 1: dynamo specializes size 1)


# -- helpers ------------------------------------------------------------------------------------
def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).eval()


def assert_tree_equal(actual, expected, where="value"):
    """Same container types all the way down, and torch.equal leaves."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.equal(actual, expected), f"{where}: values differ"
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{where}: length"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_equal(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_tree_equal(actual[k], expected[k], f"{where}[{k!r}]")
    else:
        assert actual == expected, where


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def hooked(model, submodule, *args, **kwargs):
    """Run the plain model; return ``[(args, kwargs, output)]`` for every call of ``submodule``."""
    seen = []

    def hook(mod, a, k, out):
        seen.append((_detach(a), _detach(k), _detach(out)))

    handle = submodule.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        handle.remove()
    return seen


def shares_parameters(pg, *params):
    """pg holds exactly these tensor objects (by identity), not copies."""
    held = {id(p): p for p in list(pg.parameters()) + list(pg.buffers())}
    return all(id(p) in held and held[id(p)].data_ptr() == p.data_ptr() for p in params)


def check_exact(pg, model, *args, **kwargs):
    with torch.no_grad():
        expected = model(*args, **kwargs)
        actual = pg(*args, **kwargs)
    assert_tree_equal(actual, expected)


def tree_paths(node_path):
    return set(node_path._np_all_paths())


# -- 1. a single Linear as the root -------------------------------------------------------------
@pytest.fixture(scope="module")
def linear_root():
    model = make(torch.nn.Linear, sm.D, sm.D)
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x)


def test_linear_root_exact_and_shape_generic(linear_root):
    model, x, pg = linear_root
    check_exact(pg, model, x)
    check_exact(pg, model, rand(B1, sm.D, seed=3))
    check_exact(pg, model, rand(7, sm.D, seed=4))
    assert len(pg.variants) == 1
    assert {"input_", "weight", "bias", "linear", "output"} <= set(dir(pg.graph))
    assert "Linear" in repr(pg.graph).splitlines()[0]
    assert shares_parameters(pg, model.weight, model.bias)


def test_linear_root_patches(linear_root):
    model, x, pg = linear_root
    x5 = rand(B1, sm.D, seed=3)
    with pg.patch({"weight": [wprobe := ProbePatch(), ZeroPatch()], "input_": (iprobe := ProbePatch())}):
        out = pg(x5)
    assert torch.equal(wprobe.activation, model.weight)
    assert torch.equal(iprobe.activation, x5)
    assert torch.equal(out, model.bias.detach().expand(B1, sm.D))
    assert model.weight.abs().sum() > 0  # the weight itself is untouched
    check_exact(pg, model, x5)  # and nothing is left patched
    with pg.patch({"linear": AddPatch(value=2.0), "output": (oprobe := ProbePatch())}):
        out = pg(x)
    assert torch.equal(out, F.linear(x, model.weight, model.bias).detach() + 2.0)
    assert torch.equal(oprobe.activation, out)


@pytest.mark.parametrize("cls", [sm.WithBuffer, sm.WithFloatAttr, sm.AliasedSequential, sm.WithLayerNorm])
def test_bare_tensor_root_output_patch(cls):
    """A root returning one tensor: its ``output`` node is the tensor itself."""
    model = make(cls)
    x = rand(B0, sm.D)
    pg = PatchableGraph(model, x)
    shape = pg.graph.output._shape
    assert len(shape) == 2 and isinstance(shape[0], str) and shape[0] == pg.graph.x._shape[0]  # symbolic batch
    with pg.patch({"output": [probe := ProbePatch(), ZeroPatch(slice=(0, slice(None)))]}):
        out = pg(x)
    expected = model(x).detach()
    assert torch.equal(probe.activation, expected)
    assert torch.equal(out[1:], expected[1:]) and torch.equal(out[0], torch.zeros(sm.D))


def test_static_dims_are_ints_everywhere(linear_root):
    _, _, pg = linear_root
    assert pg.graph.linear._shape[1] == sm.D
    assert pg.graph.input_._shape[1] == sm.D


# -- 2. a registered buffer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def buffer_model():
    model = make(sm.WithBuffer)
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x)


def test_buffer_exact_and_bound_by_identity(buffer_model):
    model, x, pg = buffer_model
    check_exact(pg, model, x)
    check_exact(pg, model, rand(B1, sm.D, seed=3))
    assert len(pg.variants) == 1
    assert "offset" in dir(pg.graph)
    assert shares_parameters(pg, model.offset, model.lin.weight, model.lin.bias)
    with pg.patch({"offset": (probe := ProbePatch())}):
        pg(x)
    assert torch.equal(probe.activation, model.offset)
    # an in-place change of the live buffer is seen by the graph (no copy was bound)
    saved = model.offset.clone()
    try:
        model.offset.add_(10.0)
        check_exact(pg, model, x)
    finally:
        model.offset.copy_(saved)


def test_buffer_patch(buffer_model):
    model, x, pg = buffer_model
    x5 = rand(B1, sm.D, seed=3)
    new = torch.full((sm.D,), -3.0)
    with pg.patch({"offset": ReplacePatch(value=new)}):
        out = pg(x5)
    assert torch.equal(out, (F.linear(x5, model.lin.weight, model.lin.bias) + new).detach())
    assert torch.equal(model.offset, torch.arange(sm.D, dtype=torch.float32))
    hook = hooked(model, model.lin, x5)
    with pg.patch({"lin.output": (probe := ProbePatch()), "add": ZeroPatch(slice=(slice(None), 0))}):
        out = pg(x5)
    assert torch.equal(probe.activation, hook[0][2])
    expected = model(x5)
    assert torch.equal(out[:, 1:], expected[:, 1:].detach())
    assert torch.equal(out[:, 0], torch.zeros(B1))


# -- 3. a float attribute -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_model():
    model = make(sm.WithFloatAttr)
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x)


def test_float_attribute(float_model):
    model, x, pg = float_model
    check_exact(pg, model, x)
    x5 = rand(B1, sm.D, seed=3)
    check_exact(pg, model, x5)
    assert len(pg.variants) == 1
    assert "mul" in dir(pg.graph)
    lin = F.linear(x5, model.lin.weight, model.lin.bias).detach()
    with pg.patch({"lin.output": AddPatch(value=1.0), "mul": (probe := ProbePatch())}):
        out = pg(x5)
    assert torch.equal(probe.activation, (lin + 1.0) * 0.5)
    assert torch.equal(out, (lin + 1.0) * 0.5)


# -- 4. nested submodules called with kwargs --------------------------------------------------------------
@pytest.fixture(scope="module")
def kw_model():
    model = make(sm.KwParent)
    x, z = rand(B0, sm.D), rand(B0, sm.D, seed=1)
    return model, (x, z), PatchableGraph(model, x, z)


def test_kwargs_child(kw_model):
    model, (x, z), pg = kw_model
    check_exact(pg, model, x, z)
    x5, z5 = rand(B1, sm.D, seed=3), rand(B1, sm.D, seed=4)
    check_exact(pg, model, x5, z5)
    check_exact(pg, model, x=x5, z=z5)
    assert len(pg.variants) == 1
    child = pg.graph.child
    assert {"x", "y", "lin", "output"} <= set(dir(child))
    [(args, kwargs, out)] = hooked(model, model.child, x5, z5)
    assert torch.equal(kwargs["y"], z5)
    with pg.patch({"child.y": (yprobe := ProbePatch()), "child.output": (oprobe := ProbePatch())}):
        pg(x5, z5)
    assert torch.equal(yprobe.activation, z5)
    assert torch.equal(oprobe.activation, out)


def test_kwargs_child_patch(kw_model):
    model, _, pg = kw_model
    x5, z5 = rand(B1, sm.D, seed=3), rand(B1, sm.D, seed=4)
    with pg.patch({"child.y": ReplacePatch(value=torch.ones(B1, sm.D))}):
        out = pg(x5, z5)
    lin = F.linear(x5, model.child.lin.weight, model.child.lin.bias)
    expected = F.linear(lin, model.proj.weight, model.proj.bias).detach()
    assert torch.equal(out, expected)
    with pg.patch({"child.lin.weight": ZeroPatch()}):
        out = pg(x5, z5)
    inner = model.child.lin.bias.expand(B1, sm.D) * z5
    assert torch.equal(out, F.linear(inner, model.proj.weight, model.proj.bias).detach())


# -- 5. one Linear aliased -----------------------------------------------------------------------------------
ALIASES = {
    # class: (first call's graph, second call's graph, the shared Linear, output of the second
    #         call when its weight is zeroed, computed by hand from x)
    sm.AliasedSequential: ("seq.sub_0", "seq.sub_2", lambda m: m.seq[0],
                           lambda m, x: m.seq[0].bias.expand(x.shape[0], sm.D)),
    sm.AliasedModuleList: ("layers_0", "layers_1", lambda m: m.layers[0],
                           lambda m, x: torch.relu(m.layers[0].bias.expand(x.shape[0], sm.D))),
    sm.AliasedModuleDict: ("blocks_first", "blocks_second", lambda m: m.blocks["first"],
                           lambda m, x: m.blocks["first"].bias.expand(x.shape[0], sm.D)),
}


@pytest.fixture(scope="module", params=list(ALIASES), ids=lambda c: c.__name__)
def aliased(request):
    model = make(request.param)
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x), ALIASES[request.param]


def test_aliased_linear(aliased):
    model, x, pg, (first, second, get_lin, _) = aliased
    lin = get_lin(model)
    check_exact(pg, model, x)
    x5 = rand(B1, sm.D, seed=3)
    check_exact(pg, model, x5)
    assert len(pg.variants) == 1
    assert {first, second} <= tree_paths(pg.graph)
    # both graphs bind the one shared weight, and pg holds no other parameters
    assert {id(p) for p in pg.parameters()} == {id(lin.weight), id(lin.bias)}
    calls = hooked(model, lin, x5)
    assert len(calls) == 2
    with pg.patch({f"{first}.weight": (w0 := ProbePatch()), f"{second}.weight": (w1 := ProbePatch()),
                   f"{first}.output": (o0 := ProbePatch()), f"{second}.output": (o1 := ProbePatch())}):
        pg(x5)
    assert torch.equal(w0.activation, lin.weight) and torch.equal(w1.activation, lin.weight)
    assert torch.equal(o0.activation, calls[0][2])
    assert torch.equal(o1.activation, calls[1][2])


def test_aliased_patch_one_call_only(aliased):
    model, x, pg, (first, second, get_lin, zeroed_second) = aliased
    lin = get_lin(model)
    x5 = rand(B1, sm.D, seed=3)
    calls = hooked(model, lin, x5)
    with pg.patch({f"{second}.weight": ZeroPatch(), f"{first}.output": (o0 := ProbePatch())}):
        out = pg(x5)
    assert torch.equal(o0.activation, calls[0][2])  # the first call is unaffected
    assert torch.equal(out, zeroed_second(model, x5).detach())
    assert lin.weight.abs().sum() > 0


# -- 6. a module called twice, tuple output ------------------------------------------------------------------
@pytest.fixture(scope="module")
def twice_model():
    model = make(sm.CalledTwice)
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x)


def test_called_twice(twice_model):
    model, x, pg = twice_model
    check_exact(pg, model, x)
    x5 = rand(B1, sm.D, seed=3)
    check_exact(pg, model, x5)
    assert len(pg.variants) == 1
    assert {"layer_0", "layer_1"} <= set(dir(pg.graph))
    assert {id(p) for p in pg.parameters()} == {id(model.layer.weight), id(model.layer.bias)}
    calls = hooked(model, model.layer, x5)
    with pg.patch({"layer_0.input_": (i0 := ProbePatch()), "layer_1.input_": (i1 := ProbePatch()),
                   "layer_1.output": (o1 := ProbePatch())}):
        pg(x5)
    assert torch.equal(i0.activation, calls[0][0][0])
    assert torch.equal(i1.activation, calls[1][0][0])
    assert torch.equal(o1.activation, calls[1][2])


def test_called_twice_patches_are_per_call(twice_model):
    model, _, pg = twice_model
    x5 = rand(B1, sm.D, seed=3)
    a, b = (t.detach() for t in model(x5))
    w, bias = model.layer.weight.detach(), model.layer.bias.detach()
    with pg.patch({"layer_1.linear": AddPatch(value=1.0)}):
        out = pg(x5)
    assert torch.equal(out[0], a)
    assert torch.equal(out[1], b + 1.0)
    with pg.patch({"layer_0.output": ZeroPatch()}):
        out = pg(x5)
    assert torch.equal(out[0], torch.zeros(B1, sm.D))
    assert torch.equal(out[1], bias.expand(B1, sm.D))  # layer(0 * 2) == bias
    with pg.patch({"output|sub_0": ZeroPatch()}):
        out = pg(x5)
    assert isinstance(out, tuple)
    assert torch.equal(out[0], torch.zeros(B1, sm.D))
    assert torch.equal(out[1], b)
    with pg.patch({"layer_0.weight": ZeroPatch()}):
        out = pg(x5)
    assert torch.equal(out[0], bias.expand(B1, sm.D))
    assert torch.equal(out[1], F.linear(bias.expand(B1, sm.D) * 2, w, bias))


# -- 7. nested list/tuple/dict outputs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nested_model():
    model = make(sm.NestedOuter)
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x)


def test_nested_outputs_exact(nested_model):
    model, x, pg = nested_model
    check_exact(pg, model, x)
    x5 = rand(B1, sm.D, seed=3)
    check_exact(pg, model, x5)
    assert len(pg.variants) == 1
    [(_, _, child_out)] = hooked(model, model.child, x5)
    with pg.patch({"child.output": (whole := ProbePatch()),
                   "child.output|sub_1|sub_1|sq": (sq := ProbePatch()),
                   "output|rest|sub_1": (rest := ProbePatch())}):
        pg(x5)
    assert_tree_equal(_detach(whole.activation), child_out)
    assert torch.equal(sq.activation, child_out[1][1]["sq"])
    assert_tree_equal(_detach(rest.activation), _detach(model(x5)["rest"][1]))


def test_nested_output_subpath_patches(nested_model):
    model, _, pg = nested_model
    x5 = rand(B1, sm.D, seed=3)
    expected = _detach(model(x5))
    h = F.linear(x5, model.child.lin.weight, model.child.lin.bias).detach()
    # a part of the child's output: only the parent's values computed from it change
    with pg.patch({"child.output|sub_0": AddPatch(value=1.0)}):
        out = pg(x5)
    assert torch.equal(out["first"], (h + 1.0) + 1.0)
    assert_tree_equal(out["rest"], expected["rest"])
    with pg.patch({"child.output|sub_1|sub_1|neg": ZeroPatch()}):
        out = pg(x5)
    assert torch.equal(out["rest"][1][0], torch.zeros(B1, sm.D))
    assert torch.equal(out["rest"][1][1], expected["rest"][1][1])
    assert torch.equal(out["first"], expected["first"])
    with pg.patch({"child.output|sub_1|sub_0": ZeroPatch()}):  # a list item of the child's output
        out = pg(x5)
    assert torch.equal(out["rest"][0], torch.zeros(B1, sm.D))
    assert torch.equal(out["first"], expected["first"])
    assert_tree_equal(out["rest"][1], expected["rest"][1])
    # parts of the root's output, by dict key / list index / tuple index
    with pg.patch({"output|first": ReplacePatch(value=torch.ones(B1, sm.D)),
                   "output|rest|sub_1|sub_1": ZeroPatch(),
                   "output|plain": AddPatch(value=5.0)}):
        out = pg(x5)
    assert list(out) == ["first", "rest", "plain"]
    assert isinstance(out["rest"], list) and isinstance(out["rest"][1], tuple)
    assert torch.equal(out["first"], torch.ones(B1, sm.D))
    assert torch.equal(out["rest"][0], expected["rest"][0])
    assert torch.equal(out["rest"][1][0], expected["rest"][1][0])
    assert torch.equal(out["rest"][1][1], torch.zeros(B1, sm.D))
    assert torch.equal(out["plain"], x5 + 5.0)
    assert torch.equal(x5, rand(B1, sm.D, seed=3))  # the caller's tensor is untouched


# -- 8. *args and **kwargs ------------------------------------------------------------------------------------
def _varargs_expected(model, x, args, flag, kwargs):
    h = F.linear(x, model.lin.weight, model.lin.bias) * flag
    for a in args:
        h = h + a
    for k in sorted(kwargs):
        h = h * kwargs[k]
    return h.detach()


def test_var_keyword_only():
    model = make(sm.VarArgs)
    x, alpha, beta = rand(B0, sm.D), rand(B0, sm.D, seed=1), rand(B0, sm.D, seed=2)
    pg = PatchableGraph(model, x, flag=2, alpha=alpha, beta=beta)
    check_exact(pg, model, x, flag=2, alpha=alpha, beta=beta)
    x5, a5, b5 = rand(B1, sm.D, seed=3), rand(B1, sm.D, seed=4), rand(B1, sm.D, seed=5)
    check_exact(pg, model, x5, flag=2, alpha=a5, beta=b5)
    assert len(pg.variants) == 1
    assert {"x", "alpha", "beta"} <= set(dir(pg.graph))
    with pg.patch({"alpha": ReplacePatch(value=torch.ones(B1, sm.D)), "beta": (probe := ProbePatch())}):
        out = pg(x5, flag=2, alpha=a5, beta=b5)
    assert torch.equal(probe.activation, b5)
    assert torch.equal(out, _varargs_expected(model, x5, (), 2, {"alpha": torch.ones(B1, sm.D), "beta": b5}))
    # another flag value is a new Python constant: a new variant, still exact
    check_exact(pg, model, x5, flag=3, alpha=a5, beta=b5)
    assert len(pg.variants) == 2


def test_var_positional_and_keyword():
    model = make(sm.VarArgs)
    x, e1, e2, alpha = (rand(B0, sm.D, seed=s) for s in range(4))
    pg = PatchableGraph(model, x, e1, e2, flag=2, alpha=alpha)
    check_exact(pg, model, x, e1, e2, flag=2, alpha=alpha)
    x5, f1, f2, a5 = (rand(B1, sm.D, seed=s) for s in range(10, 14))
    check_exact(pg, model, x5, f1, f2, flag=2, alpha=a5)
    assert len(pg.variants) == 1
    with pg.patch({"lin.output": ZeroPatch()}):
        out = pg(x5, f1, f2, flag=2, alpha=a5)
    assert torch.equal(out, ((f1 + f2) * a5))


# -- 9. graph breaks -> opaque modules ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def branch_model():
    model = make(sm.BranchParent)
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x)


def test_graph_break_falls_back_to_opaque(branch_model):
    model, x, pg = branch_model
    assert set(pg.artifact.extraction["opaque"]) == {"breaker"}
    assert "breaker: BranchChild (opaque)" in repr(pg.graph)
    assert "(opaque)" not in repr(pg.graph.pre) and "(opaque)" not in repr(pg.graph.post)
    check_exact(pg, model, x)
    check_exact(pg, model, rand(B1, sm.D, seed=3))
    # the branch the opaque module takes is decided at run time, per call
    big = 10 * rand(B1, sm.D, seed=3)
    taken = set()
    for inp in (big, -big):
        [(_, _, out)] = hooked(model, model.breaker.lin, inp)
        taken.add(bool((out * model.breaker.gain).sum() > 0))
        check_exact(pg, model, inp)
    assert taken == {True, False}, "test inputs should take both branches"
    # the opaque module's output sizes come from its forward run on symbolic fakes (its data
    # branch answered with the example's data): the graph around it stays shape-generic, and
    # the other batch size (exact, checked above) used the same graph (issue 10, bug 3)
    assert len(pg.variants) == 1
    assert set(pg.artifact.extraction["data_dependent"]) == {"breaker"}
    assert pg.artifact.signature["leaves"][0]["dims"] == ["dyn1", sm.D]  # (the weights pin the features)
    check_exact(pg, model, rand(1, sm.D, seed=4))  # batch 1: the same graph
    assert len(pg.variants) == 1
    assert {"x", "gain", "output"} <= set(dir(pg.graph.breaker))
    assert shares_parameters(pg, model.breaker.gain, model.breaker.lin.weight, model.pre.weight, model.post.weight)


def _branch(h):
    return h * 2 if h.sum() > 0 else h - 1


def _lin(mod, v):
    return F.linear(v, mod.weight, mod.bias)


def test_opaque_module_patches(branch_model):
    model, _, pg = branch_model
    x5 = rand(B1, sm.D, seed=3)
    brk = model.breaker
    pre = _lin(model.pre, x5).detach()
    [(args, _, out)] = hooked(model, brk, x5)
    with pg.patch({"breaker.x": (xp := ProbePatch()), "breaker.output": (op := ProbePatch()),
                   "breaker.gain": (gp := ProbePatch())}):
        pg(x5)
    assert torch.equal(xp.activation, args[0])
    assert torch.equal(op.activation, out)
    assert torch.equal(gp.activation, brk.gain)
    # its own parameter, for this call only
    new_gain = torch.full((sm.D,), -1.0)
    with pg.patch({"breaker.gain": ReplacePatch(value=new_gain)}):
        got = pg(x5)
    assert torch.equal(got, _lin(model.post, _branch(_lin(brk.lin, pre) * new_gain)).detach())
    assert torch.equal(brk.gain, torch.linspace(0.5, 2.0, sm.D))
    check_exact(pg, model, x5)
    # its input
    with pg.patch({"breaker.x": AddPatch(value=1.0)}):
        got = pg(x5)
    assert torch.equal(got, _lin(model.post, _branch(_lin(brk.lin, pre + 1.0) * brk.gain)).detach())
    # its output
    with pg.patch({"breaker.output": ZeroPatch()}):
        got = pg(x5)
    assert torch.equal(got, model.post.bias.detach().expand(B1, sm.D))


def test_opaque_module_child_patches(branch_model):
    """The opaque module's child compiles; patching its weight changes the opaque call."""
    model, _, pg = branch_model
    x5 = rand(B1, sm.D, seed=3)
    brk = model.breaker
    pre = _lin(model.pre, x5).detach()
    child = [str(p) for p in pg.graph.breaker if not p._is_value]
    assert child == ["breaker.lin"]
    [(args, _, out)] = hooked(model, brk.lin, x5)
    with pg.patch({"breaker.lin.output": (op := ProbePatch()), "breaker.lin.weight": (wp := ProbePatch())}):
        pg(x5)
    assert torch.equal(op.activation, out)
    assert torch.equal(wp.activation, brk.lin.weight)
    with pg.patch({"breaker.lin.weight": ZeroPatch()}):
        got = pg(x5)
    h = brk.lin.bias.detach().expand(B1, sm.D) * brk.gain.detach()
    assert torch.equal(got, _lin(model.post, _branch(h)).detach())
    assert brk.lin.weight.abs().sum() > 0
    with pg.patch({"breaker.lin.output": AddPatch(value=3.0)}):
        got = pg(x5)
    assert torch.equal(got, _lin(model.post, _branch((_lin(brk.lin, pre) + 3.0) * brk.gain)).detach())


def test_explicit_graph_break():
    model = make(sm.ExplicitBreakParent)
    x = rand(B0, sm.D)
    pg = PatchableGraph(model, x)
    assert set(pg.artifact.extraction["opaque"]) == {"breaker"}
    assert "breaker: ExplicitBreakChild (opaque)" in repr(pg.graph)
    check_exact(pg, model, x)
    x5 = rand(B1, sm.D, seed=3)
    check_exact(pg, model, x5)
    with pg.patch({"breaker.lin.bias": ReplacePatch(value=torch.zeros(sm.D))}):
        got = pg(x5)
    h = F.linear(x5, model.breaker.lin.weight) + 1
    assert torch.equal(got, F.linear(h, model.post.weight, model.post.bias).detach())


def test_graph_break_error_and_warning_options():
    model = make(sm.BranchParent)
    x = rand(B0, sm.D)
    with pytest.raises(ExtractionError) as info:
        PatchableGraph(model, ExtractionOptions(error_on_compilation_failure=True), x)
    assert info.value.module_path == "breaker"
    with pytest.warns(UserWarning, match="breaker"):
        pg = PatchableGraph(model, ExtractionOptions(warn_on_compilation_failure=True), x)
    check_exact(pg, model, x)
    with pytest.warns(OpaqueModuleWarning, match="breaker: ") as said:  # the default: one summary
        PatchableGraph(model, x)
    assert len([w for w in said if issubclass(w.category, OpaqueModuleWarning)]) == 1


def test_opaque_output_stays_shape_generic():
    model = make(sm.OpaqueThenReshape)
    x = rand(B0, sm.D)
    pg = PatchableGraph(model, x)
    check_exact(pg, model, x)
    check_exact(pg, model, rand(B1, sm.D, seed=3))


# -- 10. an unused submodule with parameters -------------------------------------------------------------------
def test_unused_submodule():
    model = make(sm.WithUnused)
    x = rand(B0, sm.D)
    # refused when asked for (graphpatch's default refuses in strict mode only)
    with pytest.raises(UnusedSubmoduleError) as info:
        PatchableGraph(model, ExtractionOptions(allow_unused_submodules=False), x)
    assert info.value.module_path == "unused"
    with pytest.raises(UnusedSubmoduleError):
        PatchableGraph(model, ExtractionOptions(error_on_compilation_failure=True), x)
    pg = PatchableGraph(model, x)
    check_exact(pg, model, x)
    x5 = rand(B1, sm.D, seed=3)
    check_exact(pg, model, x5)
    assert "unused" not in dir(pg.graph)
    with pg.patch({"used.bias": AddPatch(value=1.0)}):
        out = pg(x5)
    assert torch.equal(out, F.linear(x5, model.used.weight, model.used.bias + 1.0).detach())


# -- 11. LayerNorm -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layernorm_model():
    model = make(sm.WithLayerNorm)
    with torch.no_grad():  # non-trivial affine parameters
        model.norm.weight.copy_(rand(sm.D, seed=7))
        model.norm.bias.copy_(rand(sm.D, seed=8))
    x = rand(B0, sm.D)
    return model, x, PatchableGraph(model, x)


def test_layernorm(layernorm_model):
    model, x, pg = layernorm_model
    check_exact(pg, model, x)
    x5 = rand(B1, sm.D, seed=3)
    check_exact(pg, model, x5)
    assert len(pg.variants) == 1
    assert {"input_", "weight", "bias", "output"} <= set(dir(pg.graph.norm))
    assert shares_parameters(pg, model.norm.weight, model.norm.bias)
    [(args, _, out)] = hooked(model, model.norm, x5)
    with pg.patch({"norm.input_": (ip := ProbePatch()), "norm.output": (op := ProbePatch())}):
        pg(x5)
    assert torch.equal(ip.activation, args[0])
    assert torch.equal(op.activation, out)
    new_w = torch.linspace(-1, 1, sm.D)
    with pg.patch({"norm.weight": ReplacePatch(value=new_w)}):
        got = pg(x5)
    lin = F.linear(x5, model.lin.weight, model.lin.bias)
    expected = F.layer_norm(lin, (sm.D,), new_w, model.norm.bias, model.norm.eps) + x5
    assert torch.equal(got, expected.detach())


# -- 12. protected names ----------------------------------------------------------------------------------------
INPUT_NAMES = ("x", "graph", "output", "forward")


@pytest.fixture(scope="module")
def protected_model():
    model = make(sm.ProtectedNames)
    args = tuple(rand(B0, sm.D, seed=s) for s in range(4))
    return model, args, PatchableGraph(model, *args)


def test_protected_names_in_tree(protected_model):
    model, args, pg = protected_model
    check_exact(pg, model, *args)
    args5 = tuple(rand(B1, sm.D, seed=s) for s in range(3, 7))
    check_exact(pg, model, *args5)
    check_exact(pg, model, **dict(zip(INPUT_NAMES, args5)))
    assert len(pg.variants) == 1
    names = set(dir(pg.graph))
    # children, parameter and buffer: escaped with a trailing underscore, not lost
    assert {"_code_", "_shape_", "graph_", "output_", "code_", "meta_"} <= names
    for child in ("_code_", "_shape_", "graph_", "output_"):
        assert "ProtectedChild" in repr(getattr(pg.graph, child)).splitlines()[0]
        assert {"x", "lin", "output"} <= set(dir(pg.graph[child]))
    # NodePath's own members still work next to them
    assert isinstance(pg.graph._code, str) and pg.graph._shape is None
    assert "output" in names and pg.graph.output._is_value and pg.graph.output._np_node.op == "output"
    assert shares_parameters(pg, model.code, model.meta, model.graph.lin.weight, model.output.lin.weight)


def test_protected_names_patches(protected_model):
    model, _, pg = protected_model
    args5 = tuple(rand(B1, sm.D, seed=s) for s in range(3, 7))
    x5, g5, o5, f5 = args5
    calls = {name: hooked(model, getattr(model, name), *args5)[0] for name in ("_code", "_shape", "graph", "output")}
    probes = {n: ProbePatch() for n in calls}
    with pg.patch({**{f"{n}_.output": probes[n] for n in calls},
                   "code_": (cp := ProbePatch()), "meta_": (mp := ProbePatch())}):
        pg(*args5)
    for n in calls:
        assert torch.equal(probes[n].activation, calls[n][2]), n
    assert torch.equal(cp.activation, model.code)
    assert torch.equal(mp.activation, model.meta)
    # the inputs named `graph`, `output` and `forward` are escaped placeholders of the root graph
    inputs = [str(p) for p in pg.graph if p._is_value and p._np_node.op == "placeholder"]
    assert [n.rstrip("_0123456789") for n in inputs] == list(INPUT_NAMES)
    assert all(n == "x" or n.endswith("_") or "__" in n for n in inputs)
    in_probes = {n: ProbePatch() for n in inputs}
    with pg.patch(in_probes):
        pg(*args5)
    for name, value in zip(inputs, args5):
        assert torch.equal(in_probes[name].activation, value), name
    # zero the weight of the child named `graph` and replace the parameter named `code`
    new_code = torch.full((sm.D,), 2.0)
    with pg.patch({"graph_.lin.weight": ZeroPatch(), "code_": ReplacePatch(value=new_code)}):
        got = pg(*args5)
    h = F.linear(model.graph.lin.bias.expand(B1, sm.D), model.output.lin.weight, model.output.lin.bias) * o5
    assert torch.equal(got, (h * new_code + model.meta + f5).detach())
    # a patch on the child named `output`, and on the input named `forward`
    with pg.patch({"output_.output": ZeroPatch(), inputs[3]: ZeroPatch()}):
        got = pg(*args5)
    assert torch.equal(got, model.meta.detach().expand(B1, sm.D))


def test_reserved_local_variable_names():
    model = make(sm.ReservedLocals)
    x = rand(B0, sm.D)
    pg = PatchableGraph(model, x)
    check_exact(pg, model, x)
    ops = [c for c in pg.graph if c._is_value and c._np_node.op == "call_function"]
    assert len(ops) == 5
    names = [str(c) for c in ops]
    assert len(set(dir(pg.graph))) == len(dir(pg.graph))
    for name, node in zip(names, ops):
        assert getattr(pg.graph, name) is node, name
    probes = {name: ProbePatch() for name in names}
    with pg.patch(probes):
        pg(x)
    expected = [x * 2, x * 2 + 1, (x * 2 + 1) * 3, (x * 2 + 1) * 3 - 1, ((x * 2 + 1) * 3 - 1) * 2]
    for name, value in zip(names, expected):
        assert torch.equal(probes[name].activation, value), name
