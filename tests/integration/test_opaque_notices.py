"""A module that could not be compiled says so once (which, why, what still works), and a path
into it says the module is opaque instead of "close matches: (none)". Modules kept opaque on
purpose say nothing. Oracle: the plain module's output (torch.equal), warnings, error texts."""

from __future__ import annotations

import warnings

import pytest
import torch

from graphpatch_cache import ExtractionOptions, NodePathError, OpaqueModuleWarning, PatchableGraph, ProbePatch

pytestmark = pytest.mark.slow  # a few small extractions


class Branchy(torch.nn.Module):
    """Decides on data: dynamo cannot compile it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(torch.relu(h))


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x) + 1)


def _build(model, options, x):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = PatchableGraph(model, options, x)
    assert torch.equal(pg(x), model(x))
    return pg, [w for w in record if "graphpatch_cache" in str(w.message)]


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(3, 4)


def test_a_module_that_cannot_be_compiled_says_so_once(x):
    torch.manual_seed(1)
    model = Branchy().eval()
    pg, said = _build(model, ExtractionOptions(), x)
    (warning,) = said
    assert warning.category is OpaqueModuleWarning
    message = str(warning.message)
    assert "1 module could not be compiled and stays opaque" in message and "<root>: " in message
    assert "Data-dependent" in message and "What still works" in message
    with pytest.raises(NodePathError, match=r"<root> \(Branchy\) is an opaque module") as err:
        pg.graph["relu"]
    assert "close matches: (none)" not in str(err.value) and "output" in err.value.hint
    probe = ProbePatch()  # what the hint offers works
    with pg.patch({"output": probe}):
        pg(x)
    assert torch.equal(probe.activation, model(x))


def test_a_nested_module_is_named_and_kept_on_purpose_is_silent(x):
    torch.manual_seed(2)
    model = Outer().eval()
    pg, (warning,) = _build(model, ExtractionOptions(), x)
    assert "inner: " in str(warning.message) and "<root>" not in str(warning.message)
    with pytest.raises(NodePathError, match=r"inner \(Branchy\) is an opaque module"):
        pg.graph["inner.relu"]
    assert pg.graph["head.output"] is not None  # the rest compiled
    for options in (ExtractionOptions(classes_to_skip_compiling=(Branchy,)), ExtractionOptions(skip_compilation=True)):
        assert _build(model, options, x)[1] == []
    # per-module warnings instead of the summary when asked for
    said = _build(model, ExtractionOptions(warn_on_compilation_failure=True), x)[1]
    assert said and not any(w.category is OpaqueModuleWarning for w in said)
