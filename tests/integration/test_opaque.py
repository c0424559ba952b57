"""Opaque modules (skip_compilation, classes_to_skip_compiling, modules dynamo cannot trace):
graphs stay shape-generic around them, reproduce the model exactly, expose the module's
plain-data attributes as patchable nodes, and carry shape metadata on their outputs."""


import pytest
import torch
from torch import nn

from graphpatch_cache import ExtractionOptions, PatchableGraph, ProbePatch, ReplacePatch, ZeroPatch, load_cached

from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402
from structure_modules import D, BranchParent, ExplicitBreakParent, OpaqueThenReshape  # noqa: E402

pytestmark = pytest.mark.slow  # extracts GPT-2s and Llamas

SKIP = ExtractionOptions(skip_compilation=True)
SIZES = [(2, 8), (2, 11), (3, 5), (4, 16)]  # (batch, sequence); never 1: dynamo specializes it


def _ids(batch, seq, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed + 31 * seq + batch))


def _same_at_every_size(pg, model, make):
    for batch, seq in SIZES:
        args = make(batch, seq)
        got, expected = pg(**args), model(**args)
        got = got.logits if hasattr(got, "logits") else got
        expected = expected.logits if hasattr(expected, "logits") else expected
        assert torch.equal(got, expected), (batch, seq)
    assert len(pg.variants) == 1, "a new size extracted a new graph variant"


# -- shape-generic graphs ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_skip_compilation_transformers_is_exact_and_shape_generic(family):
    model = tiny_gpt2(n_layer=2) if family == "gpt2" else tiny_llama(n_layer=2)
    pg = PatchableGraph(model, SKIP, input_ids=_ids(2, 8), use_cache=False)
    assert pg.artifact.root.kind == "opaque"
    assert all(g.kind == "opaque" for g in pg.artifact.root.walk())
    assert pg.artifact.extraction["shape_specialized"] == {}
    assert all(d == "dyn" for d in pg.artifact.signature["leaves"][0]["dims"])
    _same_at_every_size(pg, model, lambda b, s: {"input_ids": _ids(b, s), "use_cache": False})


def test_skip_compilation_generate_equals_model_generate():
    model = tiny_gpt2(n_layer=2)
    ids = _ids(2, 6)
    pg = PatchableGraph(model, SKIP, input_ids=ids, use_cache=False)
    got = pg.generate(ids, max_new_tokens=8, use_cache=False)
    expected = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(got, expected)
    # the extraction call's and one for every step: generate passes a mask and position ids,
    # as model.generate does
    assert len(pg.variants) == 2
    assert torch.equal(pg.generate(ids[:, :4], max_new_tokens=3, use_cache=False),
                       model.generate(ids[:, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False))
    assert len(pg.variants) == 2  # another length: the same graphs


def test_skip_compilation_from_the_cache_extracts_once(tmp_path):
    model = tiny_gpt2(n_layer=1)
    pg = load_cached(model, options=SKIP, store=str(tmp_path), input_ids=_ids(2, 8), use_cache=False)
    for batch, seq in SIZES:
        assert torch.equal(pg(input_ids=_ids(batch, seq), use_cache=False).logits,
                           model(input_ids=_ids(batch, seq), use_cache=False).logits)
    assert len(pg.variants) == 1
    assert pg.cache_stats.misses == 1
    again = load_cached(model, options=SKIP, store=str(tmp_path), input_ids=_ids(3, 13), use_cache=False)
    assert again.cache_stats.hits == 1 and again.cache_stats.misses == 0


def test_opaque_attention_inside_a_compiled_model_is_shape_generic():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    model = tiny_gpt2(n_layer=2)
    pg = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(GPT2Attention,)),
                        input_ids=_ids(2, 8), use_cache=False)
    kinds = {g.module_path: g.kind for g in pg.artifact.root.walk()}
    assert kinds["transformer.h.0.attn"] == "opaque" and kinds["transformer.h.0.mlp"] == "compiled"
    assert pg.artifact.extraction["shape_specialized"] == {}
    _same_at_every_size(pg, model, lambda b, s: {"input_ids": _ids(b, s), "use_cache": False})
    # the attention's own children still compile, and are patchable
    with pg.patch({"transformer.h_0.attn.c_proj.output": ReplacePatch(value=0.0, slice=(..., 0))}):
        patched = pg(input_ids=_ids(3, 5), use_cache=False).logits
    # oracle: the plain model with a hook writing the same zeros into c_proj's output
    hook = model.transformer.h[0].attn.c_proj.register_forward_hook(
        lambda m, a, o: (o.__setitem__((..., 0), 0.0), None)[1])
    try:
        expected = model(input_ids=_ids(3, 5), use_cache=False).logits
    finally:
        hook.remove()
    assert torch.equal(patched, expected)


@pytest.mark.parametrize("options", [ExtractionOptions(), SKIP], ids=["compiled", "skip_compilation"])
@pytest.mark.parametrize("cls", [BranchParent, ExplicitBreakParent, OpaqueThenReshape])
def test_modules_with_graph_breaks_are_exact_at_every_size(cls, options):
    torch.manual_seed(0)
    model = cls().eval()
    # (OpaqueThenReshape reshapes by the opaque output's batch size: 2-D inputs)
    shapes = [(2, D), (3, D), (5, D), (9, D)] if cls is OpaqueThenReshape else [(2, 6, D), (3, 9, D), (5, 2, D), (4, 7, D)]
    pg = PatchableGraph(model, options, torch.randn(*shapes[0]))
    assert any(g.kind == "opaque" for g in pg.artifact.root.walk())
    assert pg.artifact.extraction["shape_specialized"] == {}
    for shape in shapes:
        for sign in (1, -1):  # both sides of BranchChild's data-dependent branch
            x = sign * torch.rand(*shape)
            assert torch.equal(pg(x), model(x)), (shape, sign)
    assert len(pg.variants) == 1


def test_a_data_dependent_branch_is_recorded_in_the_artifact():
    torch.manual_seed(0)
    pg = PatchableGraph(BranchParent().eval(), torch.randn(2, 6, D))
    assert pg.artifact.extraction["opaque"].keys() == {"breaker"}
    assert list(pg.artifact.extraction["data_dependent"]) == ["breaker"]


class SizeTaker(nn.Module):
    """Takes a size as a Python int: its stored call takes the size the graph computes."""

    def forward(self, x, n):
        torch._dynamo.graph_break()
        return x[:, :n] * 2


class PassesSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = SizeTaker()

    def forward(self, x):
        return self.inner(x, x.shape[1] - 1) + 1


def test_a_call_taking_sizes_as_ints_stays_shape_generic(tmp_path):
    model = PassesSize()
    load_cached(model, torch.randn(2, 6), store=str(tmp_path))
    pg = load_cached(model, torch.randn(3, 9), store=str(tmp_path))  # the graphs as the loader rebuilds them
    assert pg.cache_stats.hits == 1 and pg.cache_stats.misses == 0
    assert pg.artifact.extraction["shape_specialized"] == {}
    assert pg.artifact.signature["leaves"][0]["dims"] == ["dyn1", "dyn1"]  # (sizes of 1 too)
    for shape in [(2, 6), (3, 9), (5, 4), (1, 6), (2, 1), (1, 1)]:
        x = torch.randn(*shape)
        assert torch.equal(pg(x), model(x)), shape
    assert len(pg.variants) == 1
    # the size is a node of the opaque graph, named as the argument: patching it changes the call
    x = torch.randn(3, 9)
    with pg.patch({"inner.n": [seen := ProbePatch(), ReplacePatch(value=2)]}):
        patched = pg(x)
    assert seen.activation == 8
    assert torch.equal(patched, model.inner(x, 2) + 1)


class DecidesOnData(nn.Module):
    def forward(self, x, n, k=2):
        torch._dynamo.graph_break()
        return x[:, :n] * k if x.sum() > 0 else x[:, :n] - k


class PassesItOn(nn.Module):
    """Hands a size it was given (as an int) to an opaque module that decides on data."""

    def __init__(self):
        super().__init__()
        self.inner = DecidesOnData()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, n):
        return self.inner(self.lin(x), n, k=3) + n


class SizeThroughCompiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.mid = PassesItOn()

    def forward(self, x):
        return self.mid(x, x.shape[1] - 1).sum(1) + x.shape[0]


def test_a_size_passed_through_a_compiled_module_to_a_data_dependent_opaque_one():
    torch.manual_seed(0)
    model = SizeThroughCompiled()
    pg = PatchableGraph(model, torch.randn(2, 6, 4))
    assert pg.artifact.extraction["shape_specialized"] == {}
    assert list(pg.artifact.extraction["data_dependent"]) == ["mid.inner"]
    for shape in [(2, 6, 4), (3, 9, 4), (5, 3, 4)]:
        for sign in (1, -1):  # both sides of the branch
            x = sign * torch.rand(*shape)
            assert torch.equal(pg(x), model(x)), (shape, sign)
    assert len(pg.variants) == 1


# -- shape metadata --------------------------------------------------------------------------------
def _graph(artifact, module_path):
    return next(g for g in artifact.root.walk() if g.module_path == module_path)


def _node_meta(graph, name):
    return next(n.meta for n in graph.nodes if n.name == name)


def test_opaque_outputs_carry_shape_metadata():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    model = tiny_gpt2(n_layer=1)
    pg = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(GPT2Attention,)),
                        input_ids=_ids(2, 8), use_cache=False)
    # inside a compiled model: the symbolic sizes the compiled graphs around it use
    hidden = _node_meta(_graph(pg.artifact, "transformer.h.0.ln_1"), "output")["shape"]
    assert isinstance(hidden[0], str) and isinstance(hidden[1], str) and hidden[2] == 32
    attn = _graph(pg.artifact, "transformer.h.0.attn")
    for name in ("forward_output", "output"):  # (attn_output, attn_weights=None)
        assert _node_meta(attn, name)["items"][0] == {"shape": hidden, "dtype": "float32"}
    assert pg.graph.transformer.h_0.attn.output._shape is not None
    # skip_compilation: the example call's sizes (the graphs do not depend on them)
    skip = PatchableGraph(model, SKIP, input_ids=_ids(2, 8), use_cache=False)
    assert _node_meta(skip.artifact.root, "output")["fields"]["logits"] == {"shape": [2, 8, 128], "dtype": "float32"}
    assert _node_meta(_graph(skip.artifact, "transformer.ln_f"), "output") == {"shape": [2, 8, 32], "dtype": "float32"}
    assert tuple(skip.graph.transformer.ln_f.output._shape) == (2, 8, 32)


# -- attributes ------------------------------------------------------------------------------------
class WithAttributes(nn.Module):
    shadowed_class_var = 3  # a class attribute, read through the instance
    label = "plain"

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.scale = 0.5
        self.shift = 1
        self.helper = torch.relu  # not plain data: not exposed

    @property
    def doubled(self):  # a property: never exposed (reading it runs code)
        return self.scale * 2

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.lin(x) * self.shadowed_class_var * self.scale + self.shift


class HoldsAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = WithAttributes()

    def forward(self, x):
        return self.inner(x) - 1


@pytest.mark.parametrize("options", [ExtractionOptions(), SKIP], ids=["compiled", "skip_compilation"])
def test_opaque_attributes_are_patchable_for_the_call_only(options):
    torch.manual_seed(0)
    model = HoldsAttributes()
    x = torch.randn(3, D)
    pg = PatchableGraph(model, options, x)
    inner = pg.graph.inner
    assert {"shadowed_class_var", "scale", "shift", "label"} <= set(dir(inner))
    assert not {"helper", "doubled", "training", "lin_weight"} & set(dir(inner))
    with pg.patch({"inner.shadowed_class_var": ReplacePatch(value=7), "inner.scale": (probe := ProbePatch())}):
        patched = pg(x)
    assert probe.activation == 0.5
    assert "shadowed_class_var" not in vars(model.inner) and model.inner.shadowed_class_var == 3
    assert model.inner.scale == 0.5
    # oracle: the plain model with the attribute set by hand
    model.inner.shadowed_class_var = 7
    try:
        expected = model(x)
    finally:
        del model.inner.shadowed_class_var
    assert torch.equal(patched, expected)
    assert torch.equal(pg(x), model(x))
    # an instance attribute: the module's own value is back after the call
    with pg.patch({"inner.shift": ReplacePatch(value=-4)}):
        patched = pg(x)
    assert model.inner.shift == 1
    model.inner.shift = -4
    expected = model(x)
    model.inner.shift = 1
    assert torch.equal(patched, expected)


def test_opaque_attribute_restored_when_the_call_fails():
    model = HoldsAttributes()
    x = torch.randn(3, D)
    pg = PatchableGraph(model, SKIP, x)
    with pg.patch({"inner.shadowed_class_var": ReplacePatch(value="not a number")}):
        with pytest.raises(TypeError):
            pg(x)
    assert "shadowed_class_var" not in vars(model.inner) and model.inner.shadowed_class_var == 3


def test_opaque_llama_attention_with_recorded_outputs():
    """transformers collects hidden states and attention weights with forward hooks; the
    opaque attention's run on fakes must not feed them, and the graphs stay generic."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = tiny_llama(attn="eager", n_layer=2)
    extra = {"output_hidden_states": True, "output_attentions": True, "use_cache": False}
    pg = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(LlamaAttention,)),
                        input_ids=_ids(2, 8), **extra)
    assert pg.artifact.extraction["shape_specialized"] == {}
    for batch, seq in SIZES[:3]:
        got, expected = pg(input_ids=_ids(batch, seq), **extra), model(input_ids=_ids(batch, seq), **extra)
        assert torch.equal(got.logits, expected.logits)
        assert len(got.hidden_states) == len(expected.hidden_states) == 3
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states))
        assert len(got.attentions) == 2 and all(torch.equal(a, b) for a, b in zip(got.attentions, expected.attentions))
    assert len(pg.variants) == 1


def test_opaque_attributes_survive_the_cache_round_trip(tmp_path):
    """A hit rebuilds the graphs from JSON through the loader's checks: the attribute nodes
    bind, and patch the live module's value for the call only."""
    torch.manual_seed(0)
    model = HoldsAttributes()
    x = torch.randn(3, D)
    load_cached(model, x, options=SKIP, store=str(tmp_path))
    pg = load_cached(model, torch.randn(5, D), options=SKIP, store=str(tmp_path))
    assert pg.cache_stats.hits == 1 and pg.cache_stats.misses == 0
    with pg.patch({"inner.shadowed_class_var": ReplacePatch(value=-2)}):
        patched = pg(x)
    assert model.inner.shadowed_class_var == 3 and "shadowed_class_var" not in vars(model.inner)
    assert torch.equal(patched, model.inner.lin(x) * -2 * 0.5 + 1 - 1)


class CallsTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + self.a(x * 2))


def test_unpatched_calls_of_an_opaque_parent_run_directly_and_patches_still_apply():
    # An opaque parent's call of a child with nothing patched at or below it runs the child
    # module itself; a patched call is routed through its graph. Oracles: forward hooks on
    # the plain model doing the same edits, and the k-th call counting across both paths.
    torch.manual_seed(0)
    model = CallsTwice().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, ExtractionOptions(skip_compilation=True), x)
    assert torch.equal(pg(x), model(x))
    replacement = torch.randn(3, 4)
    with pg.patch({"a_1.output": [seen := ProbePatch(), ReplacePatch(value=replacement)]}):
        patched = pg(x)  # a_0 runs directly, a_1 (the second call) through its graph
    assert torch.equal(seen.activation, model.a(x * 2))
    assert torch.equal(patched, model.head(torch.relu(model.a(x)) + replacement))
    with pg.patch({"a_0.output": ReplacePatch(value=replacement)}):
        assert torch.equal(pg(x), model.head(torch.relu(replacement) + model.a(x * 2)))
    assert torch.equal(pg(x), model(x))  # no slot left: every call direct again

    gpt2 = tiny_gpt2(n_layer=3)
    ids = _ids(2, 7)
    skip = PatchableGraph(gpt2, ExtractionOptions(skip_compilation=True), input_ids=ids, use_cache=False)
    target = gpt2.transformer.h[1].mlp.c_fc
    hook = target.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        want = gpt2(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()
    with skip.patch({"transformer.h_1.mlp.c_fc.output": ZeroPatch()}):
        assert torch.equal(skip(input_ids=ids, use_cache=False).logits, want)
    assert torch.equal(skip(input_ids=ids, use_cache=False).logits, gpt2(input_ids=ids, use_cache=False).logits)
