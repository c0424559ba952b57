"""Binding guards writes into what might be a parameter, and only those: a guard walks the
model's parameters on every call, so a write into a tensor the graph made carries none."""

import dataclasses

import torch

import pytest

from graphpatch_cache import PatchableGraph, ProtectedWriteError
from graphpatch_cache.artifact import NodeData
from graphpatch_cache.live.structure import structure
from graphpatch_cache.runtime.bind import bind
from hand_built import scaling_artifact


class FreshMask(torch.nn.Module):
    """Makes a mask and writes into it in place, as transformers' mask code does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        mask = x.new_ones(x.shape, dtype=torch.bool)
        mask.masked_fill_(x < 0, False)
        mask = mask & (x < 2)  # (operator.and_: its underscore is not an in-place mark)
        return self.lin(x * mask)


def _guards(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "write_guard"]


def test_writes_into_a_tensor_the_graph_made_carry_no_guard():
    torch.manual_seed(0)
    model = FreshMask().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)
    root = pg._variants[0].root
    assert "new_ones" in root.code and "masked_fill_" in root.code and "&" in root.code  # the pattern is in the graph
    assert _guards(root) == []
    for batch in (3, 5):
        x = torch.randn(batch, 4)
        assert torch.equal(pg(x), model(x))


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 3))


def _writing_artifact(model, method: str):
    """``x.<method>(1)`` on the input, returned; bound onto ``model``."""
    artifact = scaling_artifact(model_class=f"{type(model).__module__}.{type(model).__qualname__}")
    meta = dict(artifact.root.nodes[1].meta)
    nodes = [artifact.root.nodes[0],
             NodeData(name="written", op="call_method", target=method, args={"t": [{"n": "x"}, 1]},
                      kwargs={"d": []}, meta=meta),
             dataclasses.replace(artifact.root.nodes[2], args={"t": [{"n": "written"}]})]
    root = dataclasses.replace(artifact.root, nodes=nodes)
    extraction = {**artifact.extraction, "structure": structure(model)}
    return dataclasses.replace(artifact, root=root, extraction=extraction)


def test_a_write_into_an_input_keeps_its_guard_and_it_refuses_a_parameter():
    model = Holder()
    gm = bind(_writing_artifact(model, "add_"), model)
    assert len(_guards(gm)) == 1
    mine = torch.zeros(2, 3)
    assert gm(mine) is mine and torch.equal(mine, torch.ones(2, 3))  # a caller's tensor is written as asked
    for value in (model.weight, model.weight.detach(), model.weight.detach()[1:]):
        with pytest.raises(ProtectedWriteError):
            gm(value)
    assert torch.equal(model.weight.detach(), torch.ones(2, 3))
