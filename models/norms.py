"""CNNs built around GroupNorm, InstanceNorm and LayerNorm over [C, H, W]."""

from __future__ import annotations

from torch import nn

from ._registry import calibrate, register


@register(
    "groupnorm32_cnn", "cnn", "Conv → GroupNorm(32 groups, 64 ch) → SiLU, twice", (3, 32, 32)
)
def groupnorm32_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.GroupNorm(32, 64), nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(32, 64), nn.SiLU(),
    )  # fmt: skip
    return calibrate(model, (3, 32, 32), seed=10)


@register(
    "groupnorm_edge_cnn",
    "cnn",
    "GroupNorm(groups=1) (LayerNorm-like) and groups=C",
    (3, 16, 16),
)
def groupnorm_edge_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(1, 16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(16, 16), nn.ReLU(),
    )  # fmt: skip
    return calibrate(model, (3, 16, 16), seed=11)


class StyleNet(nn.Module):
    """Style-transfer shape: conv/IN/ReLU down, a residual, conv-transpose up."""

    def __init__(self, affine: bool, track_running_stats: bool) -> None:
        super().__init__()

        def inorm(c: int) -> nn.InstanceNorm2d:
            return nn.InstanceNorm2d(c, affine=affine, track_running_stats=track_running_stats)

        self.down = nn.Sequential(
            nn.Conv2d(3, 16, 5, padding=2), inorm(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), inorm(32), nn.ReLU(),
        )  # fmt: skip
        self.res = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), inorm(32))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1), inorm(16),
            nn.ReLU(), nn.Conv2d(16, 3, 5, padding=2),
        )  # fmt: skip

    def forward(self, x):
        h = self.down(x)
        return self.up(h + self.res(h))


@register(
    "style_instancenorm", "cnn", "InstanceNorm2d(affine=True) style-transfer net", (3, 32, 32)
)
def style_instancenorm() -> nn.Module:
    return calibrate(StyleNet(affine=True, track_running_stats=False), (3, 32, 32), seed=12)


@register(
    "style_instancenorm_running",
    "cnn",
    "InstanceNorm2d(track_running_stats=True): eval uses running stats",
    (3, 32, 32),
)
def style_instancenorm_running() -> nn.Module:
    return calibrate(StyleNet(affine=True, track_running_stats=True), (3, 32, 32), seed=13)


@register(
    "layernorm_chw", "cnn", "nn.LayerNorm([32, 8, 8]) over channels and space", (3, 8, 8)
)
def layernorm_chw() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.LayerNorm([32, 8, 8]), nn.GELU(),
        nn.Conv2d(32, 8, 1),
    )  # fmt: skip
    return calibrate(model, (3, 8, 8), seed=14)
