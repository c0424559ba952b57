"""Small modules whose calls reach one submodule through several attribute paths (aliases,
shared container entries, repeats, globals): the call-naming tests' models."""

from __future__ import annotations

import torch
import torch.nn as nn

D = 4

# -- models ------------------------------------------------------------------------------------------------
class Aliased(nn.Module):
    """The issue's reproduction: one Linear under two names, called once through each."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = self.a

    def forward(self, x):
        return self.b(x) * 2 + self.a(x + 1)


class Containers(nn.Module):
    """One Linear shared by a nested ModuleDict/ModuleList, a Sequential and an attribute."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        baz = nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D), self.lin])
        self.md = nn.ModuleDict({"bar": nn.ModuleDict({"baz": baz})})
        self.seq = nn.Sequential(self.lin, nn.ReLU())

    def forward(self, x):
        y = self.md["bar"]["baz"][2](x)
        return self.seq(y) + self.lin(x)


class SharedList(nn.Module):
    """A ModuleList holding one Linear at positions 0 and 2, called by iteration."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(D, D)
        self.layers = nn.ModuleList([shared, nn.Linear(D, D), shared])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class SharedSequential(nn.Module):
    """A Sequential holding one Linear at positions 0 and 2, and the same Linear as ``head``."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(D, D)
        self.seq = nn.Sequential(shared, nn.Tanh(), shared)
        self.head = shared

    def forward(self, x):
        return self.head(self.seq(x))


class IndexedList(nn.Module):
    """A ModuleList with one Linear at 0 and 2, called by constant (also negative) index."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(D, D)
        self.layers = nn.ModuleList([shared, nn.Linear(D, D), shared])

    def forward(self, x):
        y = self.layers[0](x)
        return self.layers[-1](y) + self.layers[1](x)


class Repeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)

    def forward(self, x):
        for _ in range(3):
            x = self.a(x)
        return x


class Mixed(nn.Module):
    """Aliases and repeats together: b, a, a, b in call order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = self.a

    def forward(self, x):
        p = self.b(x)
        q = self.a(p)
        r = self.a(x * 3)
        return self.b(q + r)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(D, D)
        self.alias = self.inner

    def forward(self, x):
        return self.alias(x) - self.inner(x * 2)


class ChildThroughAlias(nn.Module):
    """The child is reached through an alias, and calls its Linear through an alias too."""

    def __init__(self):
        super().__init__()
        self.child = Inner()
        self.other = self.child

    def forward(self, x):
        return self.other(x) + 1


class ParameterNamedLikeACall(nn.Module):
    """``self.a`` called twice next to a parameter called ``a_0``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.a_0 = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return self.a(x) * self.a_0 + self.a(x * 2)


_GLOBAL_LINEAR = None


class ThroughGlobalAndList(nn.Module):
    """Calls that have no registered attribute path: through a global and a plain list."""

    def __init__(self):
        super().__init__()
        global _GLOBAL_LINEAR
        self.g = nn.Linear(D, D)
        self.h = self.g  # a second registered name: the fallback takes the first, ``g``
        _GLOBAL_LINEAR = self.g
        self.a = nn.Linear(D, D)
        self.plain = [self.a]  # not registered: a plain Python list

    def forward(self, x):
        return _GLOBAL_LINEAR(x) + self.plain[0](x * 2) + self.a(x * 3)


__all__ = ["D", "Aliased", "Containers", "SharedList", "SharedSequential", "IndexedList", "Repeated", "Mixed", "Inner", "ChildThroughAlias", "ParameterNamedLikeACall", "ThroughGlobalAndList"]
