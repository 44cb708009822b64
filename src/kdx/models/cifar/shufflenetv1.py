"""ShuffleNetV1 for CIFAR as in the CRD benchmark: groups 3, widths 240/480/960, 4/8/4 units.

Zhang et al.'s unit: grouped 1×1 conv, channel shuffle, 3×3 depthwise conv, grouped 1×1 conv; the
first unit of a stage has stride 2 and concatenates an average-pooled shortcut, the others add an
identity. The stem is a single 1×1 conv to 24 channels (no stride, no max-pool) and the first
grouped conv that reads it is not grouped. Stages: the stem output, then each stage's output.
Pre-activation stages (RepDistiller's ``preact=True``): the stem output as it is, then each stage's
last unit before its final ReLU (the sum with the identity).
Module names follow RepDistiller's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdx.models.catalog import register_model
from kdx.models.cifar.common import ChannelShuffle, PreactStagesModel, run_stages_preact


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        g = 1 if c_in == 24 else groups  # the stem's 24 channels are not split into groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        )

    def _merged(self, x: Tensor) -> Tensor:
        """Branch and shortcut merged (concatenated at stride 2, else added), before the final ReLU."""
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return torch.cat([out, res], 1) if self.stride == 2 else out + res

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self._merged(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self._merged(x)
        return F.relu(pre), pre


class ShuffleNetV1(PreactStagesModel):
    def __init__(self, widths=(240, 480, 960), depths=(4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c = 24
        for i, (width, n) in enumerate(zip(widths, depths), start=1):
            # the first unit's output is concatenated with its c-channel shortcut
            units = [
                ShuffleUnit(
                    c if j == 0 else width, width - c if j == 0 else width, 2 if j == 0 else 1, groups
                )
                for j in range(n)
            ]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            c = width
        self.embedding_dim = c
        self.linear = nn.Linear(c, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        maps, pre = [x] if stages else [], [x] if preact else []
        x = run_stages_preact(
            x, (self.layer1, self.layer2, self.layer3), maps if stages else None, pre if preact else None
        )
        return F.adaptive_avg_pool2d(x, 1).flatten(1), maps, pre


@register_model
def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)
