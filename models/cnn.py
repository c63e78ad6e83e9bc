"""Convolutional reference models with BatchNorm: the shapes folding has to handle."""

from __future__ import annotations

from torch import nn

from ._registry import calibrate, register


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


@register("conv_bn_relu", "cnn", "Conv2d(bias=False) → BatchNorm2d → ReLU", (3, 32, 32))
def conv_bn_relu() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
    )
    return calibrate(model, (3, 32, 32), seed=1)


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1×1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetMini(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@register(
    "resnet_mini", "cnn", "ResNet basic blocks, strided 1×1 conv+BN shortcut", (3, 32, 32)
)
def resnet_mini() -> nn.Module:
    return calibrate(ResNetMini(), (3, 32, 32), seed=2)


class MobileNetMini(nn.Module):
    """MobileNet-style: depthwise 3×3 + BN + ReLU6, pointwise 1×1 + BN (+ ReLU6)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, 16, stride=2), nn.ReLU6()]
        for cin, cout, stride in [(16, 24, 1), (24, 32, 2), (32, 64, 1)]:
            layers += [*conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU6()]
            layers += [*conv_bn(cin, cout, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register("mobilenet_mini", "cnn", "depthwise + pointwise convs, BN after each", (3, 32, 32))
def mobilenet_mini() -> nn.Module:
    return calibrate(MobileNetMini(), (3, 32, 32), seed=3)


class DecoderConvT(nn.Module):
    """Upsampling decoder: ConvTranspose2d (one grouped, with output_padding) + BN + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.up1(x)))
        x = self.relu(self.bn2(self.up2(x)))
        return self.head(x)


@register("decoder_convt", "cnn", "ConvTranspose2d (grouped, output_padding) + BN", (32, 8, 8))
def decoder_convt() -> nn.Module:
    return calibrate(DecoderConvT(), (32, 8, 8), seed=4)


@register("mlp_bn1d", "mlp", "Linear → BatchNorm1d → ReLU, twice, then a Linear head", (64,))
def mlp_bn1d() -> nn.Module:
    model = nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip
    return calibrate(model, (64,), seed=5)


@register("cnn1d", "cnn", "Conv1d + BatchNorm1d (strided, dilated)", (8, 64))
def cnn1d() -> nn.Module:
    model = nn.Sequential(
        nn.Conv1d(8, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Conv1d(16, 32, 3, stride=2, dilation=2, padding=2, bias=False), nn.BatchNorm1d(32),
        nn.ReLU(),
    )  # fmt: skip
    return calibrate(model, (8, 64), seed=6)


@register("cnn3d", "cnn", "Conv3d + BatchNorm3d", (2, 8, 16, 16))
def cnn3d() -> nn.Module:
    model = nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, 16, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(16),
    )  # fmt: skip
    return calibrate(model, (2, 8, 16, 16), seed=7)
