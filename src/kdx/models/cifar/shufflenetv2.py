"""ShuffleNetV2 1× for CIFAR as in the CRD benchmark: widths 116/232/464, a 1024-channel head.

Ma et al.'s units: a stride-2 down unit (two branches, concatenated) then 3/7/3 basic units (split
the channels in half, transform one half, concatenate, shuffle). The stem is a single 1×1 conv to
24 channels (no stride, no max-pool). Stages: the stem output, then each stage's output; the 1×1
conv-BN-ReLU head belongs to the embedding. Pre-activation stages (RepDistiller's ``preact=True``):
the stem output as it is, then each stage's last basic unit with its transformed half taken before
the ReLU, concatenated after the untouched half and *not* channel-shuffled (RepDistiller's order).
Module names follow RepDistiller's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdx.models.catalog import register_model
from kdx.models.cifar.common import ChannelShuffle, PreactStagesModel, run_stages_preact


def _conv(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, depthwise: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=c_in if depthwise else 1, bias=False)


class BasicUnit(nn.Module):
    """Identity on one half of the channels, 1×1 → 3×3 depthwise → 1×1 on the other."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = _conv(c, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = _conv(c, c, 3, depthwise=True), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = _conv(c, c), nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)

    def _branch(self, x2: Tensor) -> Tensor:
        """The transformed half, before its final ReLU."""
        out = F.relu(self.bn1(self.conv1(x2)))
        return self.bn3(self.conv3(self.bn2(self.conv2(out))))

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([x1, F.relu(self._branch(x2))], 1))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x.chunk(2, dim=1)
        branch = self._branch(x2)
        return self.shuffle(torch.cat([x1, F.relu(branch)], 1)), torch.cat([x1, branch], 1)


class DownUnit(nn.Module):
    """Both branches see the whole input at stride 2; each gives half the output channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1, self.bn1 = _conv(c_in, c_in, 3, 2, depthwise=True), nn.BatchNorm2d(c_in)
        self.conv2, self.bn2 = _conv(c_in, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(c_in, mid), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _conv(mid, mid, 3, 2, depthwise=True), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _conv(mid, mid), nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(PreactStagesModel):
    def __init__(self, widths=(116, 232, 464), depths=(3, 7, 3), head: int = 1024, num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.conv1, self.bn1 = _conv(3, 24), nn.BatchNorm2d(24)
        c = 24
        for i, (width, n) in enumerate(zip(widths, depths), start=1):
            self.add_module(
                f"layer{i}", nn.Sequential(DownUnit(c, width), *[BasicUnit(width) for _ in range(n)])
            )
            c = width
        self.conv2, self.bn2 = _conv(c, head), nn.BatchNorm2d(head)
        self.embedding_dim = head
        self.linear = nn.Linear(head, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        maps, pre = [x] if stages else [], [x] if preact else []
        x = run_stages_preact(
            x, (self.layer1, self.layer2, self.layer3), maps if stages else None, pre if preact else None
        )
        x = F.relu(self.bn2(self.conv2(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1), maps, pre


@register_model
def shufflenetv2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
