"""Entering and leaving ``pg.patch`` regenerates the code of the graphs that hold a patched
node and of no other (torch's ``GraphModule.recompile`` would also recompile every child
graph, recursively: the whole tree for a patch on the root)."""

from __future__ import annotations

import torch
from torch import nn

from graphpatch_cache import PatchableGraph, ProbePatch, ZeroPatch
from graphpatch_cache.runtime.bind import ModuleGraphModule


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Leaf()
        self.b = nn.Sequential(Leaf(), Leaf())

    def forward(self, x):
        return self.b(self.a(x)) + x


def _forwards(pg):
    return {name: type(m).forward for name, m in pg.named_modules() if isinstance(m, ModuleGraphModule)}


def test_a_patch_recompiles_only_the_graphs_it_touches():
    torch.manual_seed(0)
    model = Tree().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)
    before = _forwards(pg)
    root = next(name for name, m in pg.named_modules() if isinstance(m, ModuleGraphModule)
                and m._graphpatch_node_path == "")
    leaf = next(name for name, m in pg.named_modules() if isinstance(m, ModuleGraphModule)
                and m._graphpatch_node_path == "b.sub_1")
    with pg.patch({"add": ZeroPatch(), "b.sub_1.relu": (probe := ProbePatch())}):
        patched = _forwards(pg)
        assert torch.equal(pg(x), torch.zeros(3, 4))
    assert {n for n in before if patched[n] is not before[n]} == {root, leaf}
    assert _forwards(pg) == patched  # leaving keeps the code (its slots let go of their patches) ...
    assert torch.equal(pg(x), model(x))
    assert _forwards(pg) == before  # ... until a call without patches: each graph's own, compiling nothing
    assert torch.equal(probe.activation, model.b[1](model.b[0](model.a(x))))
    # the same patch set again: the code made the first time, no new code
    with pg.patch({"add": ZeroPatch(), "b.sub_1.relu": ProbePatch()}):
        assert _forwards(pg) == patched
        assert torch.equal(pg(x), torch.zeros(3, 4))
    with pg.patch({"b.sub_1.relu": ZeroPatch()}):  # other patches on the same slots: the same code
        other = _forwards(pg)
        assert {n for n in before if other[n] is not before[n]} == {leaf} and other[leaf] is patched[leaf]
        assert torch.equal(pg(x), x)  # the second block's output is zero: only the residual is left
    assert torch.equal(pg(x), model(x))


def test_remembered_patch_states_stay_correct_past_the_memo_and_when_nested():
    torch.manual_seed(0)
    model = Tree().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)
    a_out = model.a(x)
    maps = [{"a.output": ZeroPatch()}, {"b.sub_0.relu": ZeroPatch()}, {"add": ZeroPatch()}]
    expected = [model.b(torch.zeros(3, 4)) + x, model.b[1](torch.zeros(3, 4)) + x, torch.zeros(3, 4)]
    for round_ in range(12):  # more distinct blocks than a variant remembers states
        fresh = [dict(m) for m in maps] if round_ % 2 else maps  # new dicts: new blocks, new states
        for patch_map, want in zip(fresh, expected):
            with pg.patch(patch_map):
                assert torch.equal(pg(x), want)
        assert torch.equal(pg(x), model(x))
    probe = ProbePatch()
    with pg.patch({"a.output": probe}):
        with pg.patch({"a.output": ZeroPatch()}):  # inner runs after outer: the probe saw a's output
            assert torch.equal(pg(x), model.b(torch.zeros(3, 4)) + x)
            _, acts = pg.record(x, nodes=["a.output"])
            assert not acts["a.output"].any()
        assert torch.equal(probe.activation, a_out)
        assert torch.equal(pg(x), model(x))
    assert len(pg._variants[0].__dict__["_states"]) <= 8


def test_nested_blocks_with_equal_patch_maps_leave_in_any_order():
    """Blocks are left by identity: two blocks probing one node hold equal-looking entries
    (dataclass patches compare by their fields, a recorded tensor among them)."""
    torch.manual_seed(0)
    model = Tree().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)
    outer, inner = ProbePatch(), ProbePatch()
    with pg.patch({"a.output": outer}):
        pg(x)
        with pg.patch({"a.output": inner}):
            pg(x)
        pg(x + 1)  # only the outer probe is still active
    assert torch.equal(outer.activation, model.a(x + 1)) and torch.equal(inner.activation, model.a(x))
    assert torch.equal(pg(x), model(x))
