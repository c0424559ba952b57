"""Fixture modules for tests/test_structures.py: one small ``nn.Module`` per model structure."""

from __future__ import annotations

import torch
from torch import nn

D = 4  # feature size everywhere


class WithBuffer(nn.Module):
    """A registered buffer used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.register_buffer("offset", torch.arange(D, dtype=torch.float32))

    def forward(self, x):
        return self.lin(x) + self.offset


class WithFloatAttr(nn.Module):
    """A plain float attribute used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.scale = 0.5

    def forward(self, x):
        return self.lin(x) * self.scale


class KwChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, y=None):
        return self.lin(x) * y


class KwParent(nn.Module):
    """A child called with a keyword argument: ``child(x, y=z)``."""

    def __init__(self) -> None:
        super().__init__()
        self.child = KwChild()
        self.proj = nn.Linear(D, D)

    def forward(self, x, z):
        return self.proj(self.child(x, y=z))


class AliasedSequential(nn.Module):
    """One Linear object at two positions of a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(D, D)
        self.seq = nn.Sequential(lin, nn.ReLU(), lin)

    def forward(self, x):
        return self.seq(x)


class AliasedModuleList(nn.Module):
    """One Linear object twice in a ModuleList, called once per entry."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(D, D)
        self.layers = nn.ModuleList([lin, lin])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class AliasedModuleDict(nn.Module):
    """One Linear object under two keys of a ModuleDict."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(D, D)
        self.blocks = nn.ModuleDict({"first": lin, "second": lin})

    def forward(self, x):
        a = self.blocks["first"](x)
        return self.blocks["second"](torch.tanh(a))


class CalledTwice(nn.Module):
    """One child called twice; returns a tuple of both results."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(D, D)

    def forward(self, x):
        a = self.layer(x)
        b = self.layer(a * 2)
        return a, b


class NestedInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = self.lin(x)
        return (h, [h * 2, {"neg": -h, "sq": h * h}])


class NestedOuter(nn.Module):
    """Tuple/list/dict outputs nested three levels deep, in a child and at the root."""

    def __init__(self) -> None:
        super().__init__()
        self.child = NestedInner()

    def forward(self, x):
        a, (b, d) = self.child(x)
        return {"first": a + 1, "rest": [b, (d["neg"], d["sq"] - 1)], "plain": x}


class VarArgs(nn.Module):
    """``forward(self, x, *args, flag=3, **kwargs)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, *args, flag=3, **kwargs):
        h = self.lin(x) * flag
        for a in args:
            h = h + a
        for k in sorted(kwargs):
            h = h * kwargs[k]
        return h


class BranchChild(nn.Module):
    """Data-dependent Python branch: dynamo cannot capture it in one graph. Has a child and a
    parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, D))

    def forward(self, x):
        h = self.lin(x) * self.gain
        if h.sum() > 0:
            return h * 2
        return h - 1


class BranchParent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.breaker = BranchChild()
        self.post = nn.Linear(D, D)

    def forward(self, x):
        return self.post(self.breaker(self.pre(x)))


class ExplicitBreakChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = self.lin(x)
        torch._dynamo.graph_break()
        return h + 1


class ExplicitBreakParent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.breaker = ExplicitBreakChild()
        self.post = nn.Linear(D, D)

    def forward(self, x):
        return self.post(self.breaker(x))


class OpaqueThenReshape(nn.Module):
    """Code after an opaque child that uses the opaque output's (batch) size."""

    def __init__(self) -> None:
        super().__init__()
        self.breaker = BranchChild()

    def forward(self, x):
        h = self.breaker(x)
        return h.reshape(h.shape[0] * 2, D // 2)


class WithUnused(nn.Module):
    """A submodule with parameters that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(D, D)
        self.unused = nn.Linear(D, D)

    def forward(self, x):
        return self.used(x)


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(self.lin(x)) + x


class ProtectedChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x)


class ProtectedNames(nn.Module):
    """Submodules, a parameter, a buffer and inputs named like NodePath/GraphModule members."""

    def __init__(self) -> None:
        super().__init__()
        self._code = ProtectedChild()
        self._shape = ProtectedChild()
        self.graph = ProtectedChild()
        self.add_module("output", ProtectedChild())
        self.register_parameter("code", nn.Parameter(torch.linspace(-1.0, 1.0, D)))
        self.register_buffer("meta", torch.linspace(0.0, 1.0, D))

    def forward(self, x, graph, output, forward):
        h = self._code(x) + graph
        h = self._shape(h)
        h = self.graph(h)
        h = getattr(self, "output")(h) * output
        return h * self.code + self.meta + forward


class ReservedLocals(nn.Module):
    """Local variables named like reserved names: dynamo names op nodes after them."""

    def forward(self, x):
        _code = x * 2
        _shape = _code + 1
        graph = _shape * 3
        output = graph - 1
        return output * 2
