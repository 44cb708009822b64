"""CIFAR ResNets of the CRD benchmark: resnet8 … resnet110, resnet8x4, resnet32x4.

He et al.'s 6n+2 CIFAR ResNet: a 3×3 stem, three stages of n BasicBlocks (stride 1, 2, 2), global
average pooling, one linear layer. The "x4" variants widen the stages to (32,) 64, 128, 256.
Stages: the stem output, then each stage's output (post-ReLU). Pre-activation stages (RepDistiller's
``preact=True``): the stem output as it is, then each stage's last residual sum before its ReLU.
Module names follow RepDistiller's, so its CIFAR-100 checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from kdx.models.catalog import register_model
from kdx.models.cifar.common import PreactStagesModel, init_weights, run_stages_preact


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN; the shortcut projects (1×1 conv-BN) when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def _sum(self, x: Tensor) -> Tensor:
        """The residual sum, before the block's final ReLU."""
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.downsample is None else self.downsample(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self._sum(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self._sum(x)
        return F.relu(pre), pre  # not in place: ``pre`` is kept


class CifarResNet(PreactStagesModel):
    """``depth`` = 6n+2; ``widths`` = (stem, stage1, stage2, stage3) channels."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c = widths[0]
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(c if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            c = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding_dim = c
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x = self.relu(self.bn1(self.conv1(x)))
        maps, pre = [x] if stages else [], [x] if preact else []
        x = run_stages_preact(
            x, (self.layer1, self.layer2, self.layer3), maps if stages else None, pre if preact else None
        )
        return self.avgpool(x).flatten(1), maps, pre


_THIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _THIN, num_classes)


@register_model
def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _THIN, num_classes)


@register_model
def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _THIN, num_classes)


@register_model
def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _THIN, num_classes)


@register_model
def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _THIN, num_classes)


@register_model
def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _THIN, num_classes)


@register_model
def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _THIN, num_classes)


@register_model
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _X4, num_classes)


@register_model
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _X4, num_classes)
