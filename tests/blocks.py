"""Replicas of real architectures' blocks whose BatchNorm sits behind shape-only ops, shared by
the ONNX fold tests and the module fold tests (no downloads: timm is not a dependency)."""

from __future__ import annotations

from torch import nn


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: Linear → flatten(0, 1) → BatchNorm1d → reshape_as."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenMLP(nn.Module):
    """A token MLP: Linear → transpose(1, 2) → BatchNorm1d → transpose(1, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x):
        return self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2)
