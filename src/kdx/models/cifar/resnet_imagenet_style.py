"""ImageNet-style ResNets (18 / 34 / 50) adapted to 32×32 inputs: resnet18_cifar, resnet34_cifar,
resnet50_cifar.

torchvision's four-stage ResNet (64, 128, 256, 512 planes; strides 1, 2, 2, 2) with the 7×7/2 stem
and its max-pool replaced by one 3×3/1, 64-channel conv-BN-ReLU. resnet50_cifar is the CRD
benchmark's "ResNet50" teacher; resnet18_cifar / resnet34_cifar are the networks of KDA's CIFAR
experiments (512-d embedding). Stages: the stem output, then each stage's output. Pre-activation
stages (RepDistiller's ``preact=True``): the stem output as it is, then each stage's last residual
sum before its ReLU.
Module names follow RepDistiller's ``resnetv2`` so its checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from kdx.models.catalog import register_model
from kdx.models.cifar.common import PreactStagesModel, init_weights, run_stages_preact


def _projection(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """1×1 conv-BN when the shape changes, else an empty Sequential (identity)."""
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(c_in, planes, stride)

    def _sum(self, x: Tensor) -> Tensor:
        """The residual sum, before the block's final ReLU."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return out + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self._sum(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self._sum(x)
        return F.relu(pre), pre


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _projection(c_in, c_out, stride)

    def _sum(self, x: Tensor) -> Tensor:
        """The residual sum, before the block's final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self._sum(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self._sum(x)
        return F.relu(pre), pre


class CifarStemResNet(PreactStagesModel):
    def __init__(self, block: type[BasicBlock | Bottleneck], depths: Sequence[int], num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), depths, (1, 2, 2, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(block(c, planes, stride if j == 0 else 1))
                c = planes * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding_dim = c
        self.linear = nn.Linear(c, num_classes)
        init_weights(self)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        maps, pre = [x] if stages else [], [x] if preact else []
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        x = run_stages_preact(x, layers, maps if stages else None, pre if preact else None)
        return self.avgpool(x).flatten(1), maps, pre


@register_model
def resnet18_cifar(num_classes: int = 100) -> CifarStemResNet:
    return CifarStemResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model
def resnet34_cifar(num_classes: int = 100) -> CifarStemResNet:
    return CifarStemResNet(BasicBlock, (3, 4, 6, 3), num_classes)


@register_model
def resnet50_cifar(num_classes: int = 100) -> CifarStemResNet:
    return CifarStemResNet(Bottleneck, (3, 4, 6, 3), num_classes)
