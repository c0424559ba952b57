"""A model's code before an upgrade (``model_v2.py`` is the same model after it): the diff
tests compare the graphs of the two. Same parameters, so both load one state dict."""

from __future__ import annotations

import torch


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(4, 8)
        self.down = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.up(x)
        h = torch.relu(h)
        return self.down(h) * 2


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp()
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.mlp(x)
        y = self.norm(y + x)
        return self.head(y)
