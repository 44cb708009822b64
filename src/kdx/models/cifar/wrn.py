"""Wide ResNets (Zagoruyko & Komodakis) of the CRD benchmark: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

WRN-d-k: a 3×3 16-channel stem, three stages of (d-4)/6 pre-activation blocks of 16k, 32k, 64k
channels (strides 1, 2, 2), a final BN-ReLU, global average pooling, one linear layer.
Stages (as in RepDistiller): the stem output, then each stage's raw (pre-activation) output; the
final BN-ReLU belongs to the embedding. Pre-activation stages (RepDistiller's ``preact=True``): the
stem output, then each stage's output through the BatchNorm that comes next — the next stage's
first ``bn1``, and the final ``bn1`` after the last stage — without its ReLU. Each of those BatchNorms
still runs once per forward: the normalised map is handed on, not recomputed (RepDistiller applies
them a second time, which in train mode updates their running statistics twice per step).
Module names follow RepDistiller's.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdx.models.base import run_stages
from kdx.models.catalog import register_model
from kdx.models.cifar.common import PreactStagesModel, init_weights


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3, BN-ReLU-conv3×3; a 1×1 conv on the activated input when the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor, normed: Tensor | None = None) -> Tensor:
        """``normed``: ``bn1(x)`` when the caller has it already (pre-activation stages); kept intact."""
        act = self.relu1(self.bn1(x)) if normed is None else F.relu(normed)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WRNStage(nn.Module):
    """A stage of ``n`` blocks; wrapped (``.layer``) only to keep RepDistiller's state-dict keys."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(PreactStagesModel):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WRNStage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WRNStage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WRNStage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, zero_linear_bias=True)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x = self.conv1(x)
        maps, pre = [x] if stages else [], [x] if preact else []
        groups = (self.block1, self.block2, self.block3)
        if not preact:
            x = run_stages(x, groups, stages, maps)
            return self.avgpool(self.relu(self.bn1(x))).flatten(1), maps, pre
        normed = None  # the previous stage's output through this stage's first bn1
        for i, group in enumerate(groups):
            first, *rest = group.layer
            x = first(x, normed)
            for block in rest:
                x = block(x)
            if stages:
                maps.append(x)
            normed = (groups[i + 1].layer[0].bn1 if i + 1 < len(groups) else self.bn1)(x)
            pre.append(normed)
        return self.avgpool(F.relu(normed)).flatten(1), maps, pre


@register_model
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


@register_model
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@register_model
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@register_model
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
