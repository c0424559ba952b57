"""Extraction's parts that need no dynamo trace: routing values through a marker, naming a
call's input leaves, local names, and grad-mode rewriting.

Oracles: torch's own pytree (leaf order and structure), the actual grad mode torch reports
while a rebuilt graph runs, and graphpatch's documented spelling of input names.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.fx
import torch.utils._pytree as pytree

from graphpatch_cache.errors import ExtractionError
from graphpatch_cache.extraction.frames import Frame
from graphpatch_cache.extraction.grad_mode import GRAD_MODE_SWITCH, GradModes
from graphpatch_cache.extraction.local_names import LocalNames, escape_name
from graphpatch_cache.extraction.records import leaf_locations, leaf_names
from graphpatch_cache.extraction.routing import route


class Recording:
    """A marker that records the tensors it is given and returns new ones (x + 1)."""

    def __init__(self) -> None:
        self.seen: list = []

    def __call__(self, tag: str, xs: list) -> list:
        self.seen.append((tag, list(xs)))
        return [x + 1 for x in xs]


def t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


@pytest.mark.parametrize("make", [
    lambda: t(2),
    lambda: (t(1), [t(2), {"b": t(3), "a": t(4)}], 7, "s"),
    lambda: {"z": [t(1), (t(2),)], "y": None, "x": t(3)},
    lambda: collections.OrderedDict(a=t(1), b=(t(2), 3)),  # not a plain dict: through pytree
])
def test_route_passes_leaves_in_pytree_order_and_rebuilds_the_structure(make):
    value = make()
    marker = Recording()
    out = route(marker, "m0", value)
    expected = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
    (tag, seen), = marker.seen
    assert tag == "m0"
    assert len(seen) == len(expected) and all(a is b for a, b in zip(seen, expected))
    # same structure, every tensor replaced by the marker's output, other leaves kept
    assert pytree.tree_structure(out) == pytree.tree_structure(value)
    for new, old in zip(pytree.tree_leaves(out), pytree.tree_leaves(value)):
        if isinstance(old, torch.Tensor):
            assert torch.equal(new, old + 1)
        else:
            assert new == old


def test_route_writes_a_caches_tensors_back_into_the_same_object():
    transformers = pytest.importorskip("transformers")
    cache = transformers.DynamicCache()
    keys, values = t(1, 2, 3, 4), t(1, 2, 3, 4)
    cache.update(keys, values, 0)
    x = t(2)
    marker = Recording()
    out_x, out_cache = route(marker, "m1", (x, cache), transformers.Cache)
    assert out_cache is cache
    (_, seen), = marker.seen
    assert [s.shape for s in seen] == [x.shape, keys.shape, values.shape]
    assert torch.equal(out_x, x + 1)
    assert torch.equal(cache.layers[0].keys, keys + 1) and torch.equal(cache.layers[0].values, values + 1)


def forward(a, b, *rest, c=None, **extra):  # only its signature matters
    return a


def test_input_leaves_are_named_after_the_forwards_parameters():
    args = (t(1), (t(2), t(3)), t(4))
    kwargs = {"c": {"k": t(5)}, "more": t(6)}
    assert leaf_names(forward, args, kwargs) == ["a", "b_0", "b_1", "rest_0", "c_k", "more"]
    # graphpatch's spelling: *rest as ["rest", i], **extra as ["extra", key]
    assert leaf_locations(forward, args, kwargs) == [
        ["a"], ["b", 0], ["b", 1], ["rest", 0], ["c", "k"], ["extra", "more"]]


def test_local_names_number_per_base_name_and_stay_legal():
    names = LocalNames()
    assert [names.fresh(c) for c in ("mul", "mul", "mul_7", "output", "3d", "a.b", "")] == [
        "mul", "mul_1", "mul_2", "output_", "_3d", "a_b", "_unnamed"]
    assert names.exact("free") == "free"
    with pytest.raises(ExtractionError):
        names.exact("mul")
    assert [escape_name(n) for n in ("0", "forward", "class", "x.y")] == ["sub_0", "forward_", "class_", "x_y"]


def test_grad_mode_switches_restore_the_callers_mode():
    """``with torch.no_grad():`` inside a forward, rebuilt: grad is off inside, and after it the
    caller's mode comes back (not the mode seen while tracing)."""
    flat = torch.fx.Graph()
    x = flat.placeholder("x")
    off = flat.call_function(GRAD_MODE_SWITCH, (False,))
    inside = flat.call_function(torch.is_grad_enabled, ())
    on = flat.call_function(GRAD_MODE_SWITCH, (True,))
    after = flat.call_function(torch.is_grad_enabled, ())
    frame = Frame(record=None, module=torch.nn.Module(), path="", local_name="", parent=None)
    frame.env[x] = frame.graph.placeholder("x")
    modes = GradModes()
    for node in (off, inside, on, after):
        if node.target is GRAD_MODE_SWITCH:
            frame.env[node] = modes.rewrite(frame, node, lambda f, v: f.env[v])
        else:
            frame.env[node] = frame.graph.call_function(node.target, ())
    frame.graph.output((frame.env[inside], frame.env[after]))
    module = torch.fx.GraphModule(torch.nn.Module(), frame.graph)
    for caller in (True, False):
        with torch.set_grad_enabled(caller):
            assert module(torch.zeros(1)) == (False, caller)
            assert torch.is_grad_enabled() is caller
