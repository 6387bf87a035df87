"""The small network the pass tests share (importable through ``conftest.py`` beside it)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ResidualNet(nn.Module):
    """conv-bn-relu, a residual block, a strided conv, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        return self.fc(torch.relu(self.conv3(y)).mean((2, 3)))
