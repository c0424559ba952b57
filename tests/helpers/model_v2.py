"""``model_v1.py`` after an upgrade: in ``Mlp.forward`` the local ``h`` is renamed ``hidden``
and a gate is added (``hidden * torch.sigmoid(hidden)``, an op); ``Net`` lost its ``norm``
module. The parameters of the modules both keep are the same."""

from __future__ import annotations

import torch


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(4, 8)
        self.down = torch.nn.Linear(8, 4)

    def forward(self, x):
        hidden = self.up(x)
        hidden = torch.relu(hidden)
        hidden = hidden * torch.sigmoid(hidden)
        return self.down(hidden) * 2


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp()
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.mlp(x)
        return self.head(y + x)
