"""Multi-branch blocks trained as several convs and deployed as one: RepVGG and MobileOne.

Replicas of timm's ``RepVggBlock`` (``byobnet.py``) and ``MobileOneBlock`` (``mobileone.py``):
the same branches, module names and forward arithmetic (timm is not a dependency). Not in the
registry: RepVGG-A0 (8.3 M parameters) is exported by the branch-merging tests and benchmark
directly, and ``deploy --all-reference`` stays the set it was.
"""

from __future__ import annotations

import torch
from torch import nn

from models._registry import calibrate


class ConvNorm(nn.Module):
    """timm's ``ConvNormAct(apply_act=False)``: conv (no bias) → BatchNorm, padding ``k//2``."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        pad = ((stride - 1) + dilation * (k - 1)) // 2  # timm's get_padding
        self.conv = nn.Conv2d(
            cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class RepVggBlock(nn.Module):
    """k×k conv+BN, 1×1 conv+BN and, when shapes allow, an identity BN, summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        use_identity = cin == cout and stride == 1
        self.identity = nn.BatchNorm2d(cout) if use_identity else None
        self.conv_kxk = ConvNorm(cin, cout, 3, stride, groups)
        self.conv_1x1 = ConvNorm(cin, cout, 1, stride, groups)
        self.attn = nn.Identity()  # timm: no attention layer configured
        self.drop_path = nn.Identity()  # timm: drop_path_rate 0 (inference)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        x = self.attn(x)
        return self.act(x)


class RepVgg(nn.Module):
    """timm's RepVGG layout: a RepVGG-block stem, stages whose first block has stride 2, global
    average pool and a linear classifier."""

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        num_classes: int = 1000,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.stem = RepVggBlock(3, widths[0], stride=2)
        stages, cin = [], widths[0]
        for width, depth in zip(widths[1:], depths[1:], strict=True):
            blocks = [
                RepVggBlock(cin if i == 0 else width, width, 2 if i == 0 else 1, groups)
                for i in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# timm repvgg_a0: stem 48, stages 48/96/192/1280 with 2/4/14/1 blocks (stem counted as depth 1)
REPVGG_A0_WIDTHS = (48, 48, 96, 192, 1280)
REPVGG_A0_DEPTHS = (1, 2, 4, 14, 1)


def repvgg_a0(num_classes: int = 1000, seed: int = 0) -> RepVgg:
    """RepVGG-A0 in eval mode with calibrated, non-trivial BatchNorm statistics: 22 blocks,
    61 BatchNorms (17 of them identity branches)."""
    torch.manual_seed(seed)
    model = RepVgg(REPVGG_A0_WIDTHS, REPVGG_A0_DEPTHS, num_classes)
    return calibrate(model, (3, 32, 32), seed=seed, steps=3, batch=4)


class MobileOneBlock(nn.Module):
    """timm's MobileOne block: ``num_conv_branches`` k×k conv+BN branches, a 1×1 conv+BN
    "scale" branch when k > 1, an identity BN when shapes allow; depthwise with ``groups=cin``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.conv_kxk = nn.ModuleList(
            ConvNorm(cin, cout, k, stride, groups) for _ in range(num_conv_branches)
        )
        self.conv_scale = ConvNorm(cin, cout, 1, stride, groups) if k > 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out: torch.Tensor | int = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out: torch.Tensor | int = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for conv in self.conv_kxk:
            out += conv(x)
        return self.act(out)


def repvgg_mini() -> tuple[RepVgg, tuple[torch.Tensor]]:
    """A small RepVGG (stem 8, stages 8/16 with 2 blocks each: 12 BatchNorms, 2 of them
    identity branches) and its example input, for ``deploy models.reparam:repvgg_mini``."""
    torch.manual_seed(1)
    model = calibrate(RepVgg((8, 8, 16), (1, 2, 2), num_classes=10), (3, 16, 16), seed=1)
    return model, (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)),)
