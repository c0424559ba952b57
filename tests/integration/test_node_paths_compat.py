"""Node paths as graphpatch users write them: ``_shape`` and ``_code``, attribute access into
nested values (``pg.graph.output.sub_1``), inputs by their place in the forward's signature
(``foos|sub_0``, ``bars|a``, ``input``), and buffers.

Oracles: the plain model's output (``torch.equal``), the tensors passed in, values computed
by hand from the model's own modules, and shapes that ProbePatch records at run time.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from tiny_models import tiny_gpt2, token_inputs
from graphpatch_cache import (
    ExtractionOptions,
    GraphArtifact,
    NodePathError,
    NotAValueError,
    PatchableGraph,
    PatchError,
    ProbePatch,
    ReplacePatch,
    ZeroPatch,
)
from graphpatch_cache.errors import ShapeError
from graphpatch_cache.runtime.shapes import ShapeDict, ShapeTuple, SymbolicShape, SymbolicSize

pytestmark = pytest.mark.slow  # the gpt2 fixture extracts a GPT-2 (about 8 s here)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- models ------------------------------------------------------------------------------------
class Nested(nn.Module):
    """Tuple and deeply nested outputs, a buffer, and a child whose forward takes ``input``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("shift", torch.arange(4, dtype=torch.float32))

    def forward(self, x):
        h = self.lin(x) + self.shift
        return h, (h * 2, {"k": h + 1, "deep": (h - 1, [h * 3])}), h.sum(-1)


class VarArgs(nn.Module):
    """``*foos`` and ``**bars`` at the root and in a child, and a nested (tuple) argument."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = Mix()
        self.pairs = Pairs()

    def forward(self, *foos, **bars):
        y = self.mix(foos[0], foos[1], scale=bars["a"])
        return self.pairs((y, bars["b"])) + foos[2]


class Mix(nn.Module):
    def forward(self, *xs, **kw):
        return xs[0] * kw["scale"] - xs[1]


class Pairs(nn.Module):
    def forward(self, pair):
        return pair[0] * 2 + pair[1]


class Buffered(nn.Module):
    """Buffers of the model and of a child (BatchNorm's running statistics in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0, 4.0]))
        with torch.no_grad():
            self.bn.running_mean.copy_(rand(4, seed=5))
            self.bn.running_var.copy_(rand(4, seed=6).abs() + 0.5)

    def forward(self, x):
        return self.bn(x) * self.scale


def _make(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


@pytest.fixture(scope="module")
def nested():
    model = _make(Nested)
    x = rand(3, 4, seed=1)
    return model, x, PatchableGraph(model, x)


@pytest.fixture(scope="module")
def varargs():
    model = _make(VarArgs)
    xs = [rand(3, 4, seed=i) for i in range(5)]
    return model, xs, PatchableGraph(model, xs[0], xs[1], xs[2], a=xs[3], b=xs[4])


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2(n_layer=2)
    inputs = token_inputs(batch=2, seq=8)
    return model, inputs, PatchableGraph(model, **inputs)


# -- _shape ------------------------------------------------------------------------------------
def test_concrete_shape_is_a_torch_size_for_torch_zeros(gpt2):
    # ROME-style code: torch.zeros(pg.graph[node]._shape) for weights and buffers, whose
    # shapes never depend on the inputs
    model, inputs, pg = gpt2
    nodes = ["transformer.h_0.mlp.c_proj.weight", "transformer.h_1.attn.c_attn.bias", "lm_head.weight"]
    probes = {n: ProbePatch() for n in nodes}
    with pg.patch(probes):
        pg(**inputs)
    for node in nodes:
        shape = pg.graph[node]._shape
        assert type(shape) is torch.Size
        assert torch.zeros(shape).shape == probes[node].activation.shape
    assert pg.graph["transformer.h_0.mlp.c_proj.weight"]._shape == model.transformer.h[0].mlp.c_proj.weight.shape


def test_concrete_activation_shape_where_no_dim_is_symbolic():
    # a 1-D input whose only size is fixed by the weight: every dim is concrete (a batch of 1
    # is not: it shares the graph with larger batches, so it is symbolic)
    model = _make(Nested)
    x = rand(4, seed=1)
    pg = PatchableGraph(model, x)
    with pg.patch({"lin.output": (probe := ProbePatch()), "output|sub_2": (total := ProbePatch())}):
        pg(x)
    assert pg.graph.lin.output._shape == torch.Size([4])
    assert torch.zeros(pg.graph.lin.output._shape).shape == probe.activation.shape
    assert torch.zeros(pg.graph.output.sub_2._shape).shape == total.activation.shape == ()


def test_symbolic_shape_names_its_sizes_and_matches_probes_for_two_input_sizes(gpt2):
    model, inputs, pg = gpt2
    nodes = {
        "transformer.h_0.mlp.act.mul_3": pg.graph.transformer.h_0.mlp.act.mul_3,
        "transformer.h_0.attn.c_attn.view": pg.graph.transformer.h_0.attn.c_attn.view,  # (batch*seq, 32)
        "transformer.h_1.attn.split|sub_2": pg.graph.transformer.h_1.attn.split.sub_2,
        "output|logits": pg.graph.output.logits,
    }
    ids = pg.graph.input_ids._shape
    assert isinstance(ids, SymbolicShape) and len(ids.symbols) == 2
    batch, seq = ids
    assert isinstance(batch, SymbolicSize) and isinstance(seq, SymbolicSize)
    assert ids.sources == {batch: "input_ids.shape[0]", seq: "input_ids.shape[1]"}
    assert ids.names == {batch: "batch", seq: "seq"}  # shown by name, still equal to the symbols' text
    assert repr(ids) == "SymbolicShape([batch, seq])" and repr(batch) == "batch" and batch == str(batch)
    act = nodes["transformer.h_0.mlp.act.mul_3"]._shape
    assert tuple(act) == (batch, seq, 128) and repr(act) == "SymbolicShape([batch, seq, 128])"
    tree = repr(pg.graph).splitlines()
    assert tree[1] == f"sizes: batch = input_ids.shape[0] ({batch}), seq = input_ids.shape[1] ({seq})"
    assert any(ln.endswith("mul_3: Tensor(float32)[batch, seq, 128]") for ln in tree)
    view = nodes["transformer.h_0.attn.c_attn.view"]._shape
    assert set(view[0].symbols) == {batch, seq} and view[1] == 32  # an expression of both sizes
    for b, s in ((2, 8), (3, 5)):
        call = token_inputs(batch=b, seq=s, seed=b)
        probes = {path: ProbePatch() for path in nodes}
        with pg.patch(probes):
            pg(**call)
        for path, node in nodes.items():
            shape = node._shape
            assert isinstance(shape, SymbolicShape)
            assert shape.at(**call) == probes[path].activation.shape, path
            assert shape.subs({batch: b, seq: s}) == probes[path].activation.shape, path
            assert shape.subs({"batch": b, "seq": s}) == probes[path].activation.shape, path
    assert len(pg.variants) == 1  # both sizes ran through the one shape-generic graph


def test_nested_shapes_are_structures_with_parts_by_name(gpt2, nested):
    model, inputs, pg = gpt2
    out = pg.graph.output._shape
    assert isinstance(out, ShapeDict) and out.type_name == "CausalLMOutputWithCrossAttentions"
    logits = model(**inputs).logits
    assert out.logits.at(**inputs) == logits.shape
    assert out.at(**inputs)["logits"] == logits.shape
    assert pg.graph.transformer.h_0.mlp.c_fc.size._shape == "int"

    nmodel, x, npg = nested
    shape = npg.graph.output._shape
    assert isinstance(shape, ShapeTuple) and len(shape) == 3
    real = nmodel(x)
    concrete = shape.at(x)
    assert concrete.sub_0 == real[0].shape and concrete[2] == real[2].shape
    assert concrete.sub_1.sub_1.k == real[1][1]["k"].shape
    assert concrete.sub_1.sub_1.deep.sub_1.sub_0 == real[1][1]["deep"][1][0].shape
    assert npg.graph.output.sub_1.sub_1.deep._shape.at(x).sub_0 == real[1][1]["deep"][0].shape
    assert npg.graph.lin._shape is None


def test_shape_at_refuses_inputs_that_do_not_fit(nested):
    _, x, pg = nested
    shape = pg.graph.lin.output._shape
    with pytest.raises(ShapeError, match="size 5 in dim 1"):
        shape.at(rand(3, 5))
    with pytest.raises(ShapeError, match="no size for symbol"):
        shape.subs({})
    with pytest.raises(ValueError):  # ShapeError is a ValueError too
        shape.at(rand(2, 3, 4))
    # sizes come from artifacts, which may come from a shared store: only arithmetic evaluates
    with pytest.raises(ShapeError, match="does not accept"):
        SymbolicSize('__import__("os").getcwd()').evaluate({})
    assert SymbolicSize("(s25//2) + Max(1, s3) - 2*s3").evaluate({"s25": 7, "s3": 4}) == 3 + 4 - 8


# -- _code ---------------------------------------------------------------------------------------
def test_code_shows_as_code(gpt2):
    _, _, pg = gpt2
    mlp = pg.graph.transformer.h_0.mlp
    code = mlp._code
    assert isinstance(code, str)
    assert repr(code) == str(code)  # a notebook shows the code, not one escaped line
    lines = repr(code).splitlines()
    assert len(lines) > 3 and any(ln.startswith("def forward(self") for ln in lines)
    assert "self.c_fc(" in code
    line = mlp.act.mul_3._code
    assert repr(line) == str(line) and "in forward" in line and "\\n" not in repr(line)


# -- parts of nested values ------------------------------------------------------------------------
def _replaced(output, index, value):
    items = list(output)
    items[index] = value
    return tuple(items)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)


def test_attribute_and_string_paths_patch_the_same_part(nested):
    model, x, pg = nested
    part = pg.graph.output.sub_1
    assert str(part) == "output|sub_1" and pg.graph["output|sub_1"] == part
    real = model(x)
    new = (rand(3, 4, seed=7), {"k": rand(3, 4, seed=8), "deep": (rand(3, 4, seed=9), [rand(3, 4, seed=10)])})
    expected = _replaced(real, 1, new)
    for key in (part, "output|sub_1"):
        with pg.patch({key: ReplacePatch(value=new)}):
            _assert_same(pg(x), expected)
    _assert_same(pg(x), real)


def test_deeply_nested_part_by_attribute_string_and_graphpatch_form(nested):
    model, x, pg = nested
    node = pg.graph.output.sub_1.sub_1.deep.sub_1.sub_0
    assert str(node) == "output|sub_1|sub_1|deep|sub_1|sub_0"
    real = model(x)
    value = rand(3, 4, seed=11)
    expected = (real[0], (real[1][0], {"k": real[1][1]["k"], "deep": (real[1][1]["deep"][0], [value])}), real[2])
    for key in (node, str(node), "output|sub_1.sub_1.deep.sub_1.sub_0"):
        with pg.patch({key: ReplacePatch(value=value)}):
            _assert_same(pg(x), expected)
    assert pg.graph["output.sub_1.sub_1.k"] == pg.graph.output.sub_1.sub_1.k  # graphpatch's dotted look-up
    assert pg.graph.output[1]["sub_1"]["k"] == pg.graph.output.sub_1.sub_1.k


def test_parts_of_an_op_value_and_of_a_model_output(gpt2):
    model, inputs, pg = gpt2
    # the value half of GPT-2's fused qkv projection, computed by hand from the model's modules
    t = model.transformer
    ids = inputs["input_ids"]
    h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1])[None])
    with torch.no_grad():
        v = t.h[0].attn.c_attn(t.h[0].ln_1(h)).split(32, dim=2)[2]
    with pg.patch({pg.graph.transformer.h_0.attn.split.sub_2: (a := ProbePatch()),
                   "transformer.h_0.attn.split|sub_2": (b := ProbePatch())}):
        pg(**inputs)
    assert torch.allclose(a.activation, v, atol=1e-6) and torch.equal(a.activation, b.activation)
    logits = torch.zeros(2, 8, 128)
    with pg.patch({pg.graph.output.logits: ReplacePatch(value=logits)}):
        assert torch.equal(pg(**inputs).logits, logits)


def test_value_tree_lists_its_parts(nested):
    _, _, pg = nested
    assert {"sub_0", "sub_1", "sub_2", "_code", "_shape"} <= set(dir(pg.graph.output))
    text = repr(pg.graph.output.sub_1).splitlines()
    assert text[0].startswith("sub_1: tuple(")
    assert any(ln.endswith("k: " + repr(pg.graph.output.sub_1.sub_1.k).splitlines()[0][3:]) for ln in text)
    assert any("deep: tuple(" in ln for ln in text)


def test_bad_parts_are_refused_when_patching(nested, gpt2):
    model, x, pg = nested
    with pytest.raises(NodePathError, match="sub_0, sub_1, sub_2"):
        with pg.patch({"output|sub_3": ZeroPatch()}):
            pass
    with pytest.raises(KeyError, match="deep, k|k, deep"):  # NodePathError is a KeyError, as in graphpatch
        with pg.patch({"output|sub_1|sub_1|nope": ZeroPatch()}):
            pass
    with pytest.raises(NodePathError, match="is a tensor"):  # never an in-place write into a value
        with pg.patch({"lin.weight|sub_0": ZeroPatch()}):
            pass
    with pytest.raises(NotAValueError):
        with pg.patch({pg.graph.lin: ZeroPatch()}):
            pass
    with pytest.raises(AttributeError, match="sub_0, sub_1, sub_2|sub_0"):
        pg.graph.output.sub_9
    _, inputs, gpg = gpt2
    with pytest.raises(NodePathError, match="logits"):  # a ModelOutput's parts are its fields
        with gpg.patch({"output|sub_0": ZeroPatch()}):
            pass
    _assert_same(pg(x), model(x))


def test_parts_of_values_without_recorded_structure_are_checked_when_the_graph_runs():
    model = _make(Nested)
    x = rand(3, 4, seed=1)
    opaque = PatchableGraph(model, ExtractionOptions(skip_compilation=True), x)
    # opaque calls record their output's structure: parts are checked at pg.patch()
    assert opaque.graph.output._shape.sub_1.sub_1.k == torch.Size([3, 4])
    with pytest.raises(NodePathError, match="deep, k|k, deep"):
        with opaque.patch({"output|sub_1|sub_1|nope": ZeroPatch()}):
            pass
    # a value without recorded structure (an artifact that has none, e.g. from an older
    # release): parts are checked when the graph runs, and a tensor is never written into
    # through a part
    data = opaque.artifact.to_dict()
    for node in data["root"]["nodes"]:
        if node["name"] in ("forward_output", "output"):
            node["meta"] = {}
    pg = PatchableGraph.from_artifact(model, GraphArtifact.from_dict(data))
    assert pg.graph.output._shape is None
    real = model(x)
    value = rand(3, 4, seed=12)
    with pg.patch({"output|sub_1|sub_1|k": ReplacePatch(value=value)}):
        out = pg(x)
    _assert_same(out, (real[0], (real[1][0], {"k": value, "deep": real[1][1]["deep"]}), real[2]))
    weight = model.lin.weight.detach().clone()
    with pytest.raises(NodePathError, match="is a tensor"):  # lin.output's meta is recorded
        with pg.patch({"lin.output|sub_0": ZeroPatch()}):
            pass
    for key, match in (("output|sub_0|sub_0", "has no parts"), ("output|sub_1|sub_1|nope", "'deep'"),
                       ("output|sub_1|sub_1|sub_0", "by name")):
        with pg.patch({key: ZeroPatch()}):
            with pytest.raises(PatchError, match=match):
                pg(x)
    assert torch.equal(model.lin.weight, weight)
    _assert_same(pg(x), real)
    # with only the parent opaque, lin is traced on its own (its opaque parent calls it):
    # its sizes are its own symbols
    parent_opaque = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(Nested,)), x)
    with pytest.raises(ShapeError, match="traced on its own"):
        parent_opaque.graph.lin.input_._shape.at(x)


# -- inputs by their place in the signature -------------------------------------------------------
def test_varargs_and_kwargs_by_graphpatch_names(varargs):
    model, xs, pg = varargs
    # aliases of the existing names
    assert pg.graph["foos|sub_0"] == pg.graph.foos
    assert pg.graph["foos|sub_1"] == pg.graph.foos_1
    assert pg.graph["bars|a"] == pg.graph.a
    assert pg.graph["mix.xs|sub_1"] == pg.graph.mix["xs_1"]
    tree = repr(pg.graph).splitlines()  # the tree shows each input's alias
    assert any(ln.endswith("foos_1: Tensor(float32)[" + ", ".join(map(str, pg.graph.foos_1._shape)) + "] (alias: foos|sub_1)")
               for ln in tree)
    assert any(ln.endswith("(alias: bars|a)") for ln in tree) and any(ln.endswith("(alias: pair|sub_1)") for ln in tree)
    paths = ["foos|sub_0", "foos|sub_1", "foos|sub_2", "bars|a", "bars|b",
             "mix.xs|sub_0", "mix.xs|sub_1", "mix.kw|scale", "pairs.pair|sub_1", "pairs.pair|sub_0"]
    probes = {p: ProbePatch() for p in paths}
    with pg.patch(probes):
        out = pg(xs[0], xs[1], xs[2], a=xs[3], b=xs[4])
    assert torch.equal(out, model(xs[0], xs[1], xs[2], a=xs[3], b=xs[4]))
    for path, want in zip(paths[:8], [xs[0], xs[1], xs[2], xs[3], xs[4], xs[0], xs[1], xs[3]]):
        assert torch.equal(probes[path].activation, want), path
    assert torch.equal(probes["pairs.pair|sub_1"].activation, xs[4])
    assert torch.equal(probes["pairs.pair|sub_0"].activation, xs[0] * xs[3] - xs[1])


def test_patching_through_an_alias_is_patching_the_input(varargs):
    model, xs, pg = varargs
    new = rand(3, 4, seed=20)
    for key in ("bars|a", "a", "mix.kw|scale"):
        with pg.patch({key: ReplacePatch(value=new)}):
            out = pg(xs[0], xs[1], xs[2], a=xs[3], b=xs[4])
        assert torch.equal(out, model(xs[0], xs[1], xs[2], a=new, b=xs[4])), key
    with pg.patch({"foos|sub_2": ReplacePatch(value=new)}):
        assert torch.equal(pg(xs[0], xs[1], xs[2], a=xs[3], b=xs[4]), model(xs[0], xs[1], new, a=xs[3], b=xs[4]))
    with pytest.raises(NodePathError):
        with pg.patch({"foos|sub_3": ZeroPatch()}):
            pass


def test_input_is_reachable_as_input(nested):
    model, x, pg = nested
    assert pg.graph.lin.input == pg.graph.lin.input_ and str(pg.graph.lin.input) == "lin.input_"
    assert pg.graph["lin.input"] == pg.graph.lin.input_
    assert "input" in dir(pg.graph.lin)
    with pg.patch({"lin.input": (a := ProbePatch()), pg.graph.lin.input: (b := ProbePatch()),
                   "x": (c := ProbePatch())}):
        pg(x)
    assert torch.equal(a.activation, x) and torch.equal(b.activation, x) and torch.equal(c.activation, x)
    new = rand(3, 4, seed=30)
    with pg.patch({"lin.input": ReplacePatch(value=new)}):
        _assert_same(pg(x), model(new))


def test_artifacts_without_input_locations_keep_their_names(varargs):
    # an artifact written before inputs recorded their place in the signature: names work,
    # aliases are simply absent
    model, xs, pg = varargs
    data = pg.artifact.to_dict()

    def strip(graph):
        for nd in graph["nodes"]:
            nd["meta"].pop("input", None)
        for child in graph["children"]:
            strip(child)

    strip(data["root"])
    old = PatchableGraph.from_artifact(model, GraphArtifact.from_dict(data))
    with old.patch({"foos_1": (probe := ProbePatch())}):
        old(xs[0], xs[1], xs[2], a=xs[3], b=xs[4])
    assert torch.equal(probe.activation, xs[1])
    with pytest.raises(NodePathError):
        old.graph["foos|sub_1"]


# -- buffers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("node, owner, name", [("scale", "", "scale"), ("bn.running_mean", "bn", "running_mean")])
def test_buffers_are_probed_and_patched_without_touching_the_model(node, owner, name):
    model = _make(Buffered)
    x = rand(3, 4, seed=2)
    pg = PatchableGraph(model, x)
    module = model.get_submodule(owner)
    real = getattr(module, name)
    before, ptr = real.clone(), real.data_ptr()
    with pg.patch({node: (probe := ProbePatch())}):
        assert torch.equal(pg(x), model(x))
    assert torch.equal(probe.activation, real)
    new = rand(4, seed=40)
    with pg.patch({node: ReplacePatch(value=new)}):
        patched = pg(x)
    by_hand = copy.deepcopy(model)
    setattr(by_hand.get_submodule(owner), name, new.clone())
    assert torch.equal(patched, by_hand(x))
    assert not torch.equal(patched, model(x))
    assert getattr(module, name) is real and real.data_ptr() == ptr and torch.equal(real, before)
    assert torch.equal(pg(x), model(x))
