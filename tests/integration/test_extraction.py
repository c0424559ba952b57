"""Extraction options and behaviours that are not about a particular model structure."""

import pytest
import torch
import torch.fx

from graphpatch_cache import ExtractionOptions, PatchableGraph, ProbePatch, ReplacePatch


class NoGradInside(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            y = self.lin(x)
        return self.lin(x) + y


def test_grad_mode_switches_are_relative_to_the_caller():
    torch.manual_seed(0)
    model = NoGradInside()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)
    with torch.no_grad():
        out = pg(x)
        assert not torch.is_grad_enabled()
        assert not out.requires_grad
    out = pg(x)
    expected = model(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    grad_pg = model.lin.weight.grad.clone()
    model.zero_grad()
    expected.sum().backward()
    assert torch.equal(grad_pg, model.lin.weight.grad)


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward(self, x):
        return x * self.weight


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = Scale()

    def forward(self, x):
        return self.scale(x) + 1


def _scale_graph(module):
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("weight")
    prod = g.call_function(torch.mul, (x, w))
    prod.name = "scaled"
    g.output(prod)
    return g


def test_custom_extraction_function():
    model = Outer()
    x = torch.randn(3, 2)
    pg = PatchableGraph(model, ExtractionOptions(custom_extraction_functions={Scale: _scale_graph}), x)
    assert torch.equal(pg(x), model(x))
    assert "scaled" in dir(pg.graph.scale)
    with pg.patch({"scale.scaled": ReplacePatch(value=torch.zeros(3, 2))}):
        assert torch.equal(pg(x), torch.ones(3, 2))


def test_skip_compilation_and_classes_to_skip():
    model = Outer()
    x = torch.randn(3, 2)
    pg = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(Scale,)), x)
    assert pg.artifact.root.children[0].kind == "opaque"
    assert torch.equal(pg(x), model(x))
    with pg.patch({"scale.weight": ReplacePatch(value=torch.tensor([10.0, 10.0]))}):
        assert torch.equal(pg(x), x * 10 + 1)
    assert torch.equal(model.scale.weight, torch.tensor([2.0, 3.0]))
    pg_all = PatchableGraph(model, ExtractionOptions(skip_compilation=True), x)
    assert pg_all.artifact.root.kind == "opaque"
    assert torch.equal(pg_all(x), model(x))
    with pg_all.patch({"output": (probe := ProbePatch())}):
        pg_all(x)
    assert torch.equal(probe.activation, model(x))


def test_postprocessing_function_sees_the_root_graph():
    seen = []
    model = Outer()
    x = torch.randn(3, 2)
    PatchableGraph(model, ExtractionOptions(postprocessing_function=seen.append), x)
    assert len(seen) == 1 and isinstance(seen[0], torch.fx.GraphModule)


@pytest.mark.slow
def test_values_collected_by_output_recorders_are_returned():
    """transformers 5 collects hidden states and attention weights with hooks, so they leave
    module calls without being returned; they become extra outputs of those calls."""
    from tiny_models import tiny_llama, token_inputs

    model = tiny_llama(attn="eager")
    inputs = dict(token_inputs(), output_hidden_states=True, output_attentions=True)
    pg = PatchableGraph(model, **inputs)
    assert pg.artifact.extraction["opaque"] == {}
    for call in (inputs, dict(token_inputs(3, 5), output_hidden_states=True, output_attentions=True)):
        got, expected = pg(**call), model(**call)
        assert torch.equal(got.logits, expected.logits)
        assert len(got.hidden_states) == len(expected.hidden_states) == 3
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states))
        assert all(torch.equal(a, b) for a, b in zip(got.attentions, expected.attentions))
    seen = {}
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.update(out=o))
    model(**inputs)
    handle.remove()
    with pg.patch({"model.layers_0.output": (probe := ProbePatch())}):
        pg(**inputs)
    assert torch.equal(probe.activation, seen["out"])  # the module's own output, not the extras
