"""MobileNetV2 for CIFAR as in the CRD benchmark (from RCO): ``mobile_half`` = width 0.5, expansion 6.

Sandler et al.'s inverted residuals (1×1 expand, 3×3 depthwise, 1×1 linear projection; a residual
when stride 1 and widths match), a 3×3/2 stem, seven block groups, a 1×1 conv to 1280 channels
(not scaled down at width < 1), global average pooling, one linear layer. Unlike torchvision, the
1×1 expansion is kept when the expansion ratio is 1. Stages: the stem output and the outputs of
groups 2, 3, 5 and 7 (16×16, 16×16, 8×8, 4×4, 2×2 on 32×32 inputs). Pre-activation stages are
the same maps: RepDistiller's ``preact=True`` leaves MobileNetV2's features as they are (each group
ends in a linear bottleneck, with no ReLU to take off).
Module names follow RepDistiller's, except ``classifier`` is the ``nn.Linear`` itself (RepDistiller
wraps it in a Sequential: rename ``classifier.0.*`` → ``classifier.*`` to load its checkpoints).
"""

from __future__ import annotations

from torch import Tensor, nn

from kdx.models.catalog import register_model
from kdx.models.cifar.common import PreactStagesModel, init_weights


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            *conv_bn_relu(c_in, hidden, 1),
            *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(PreactStagesModel):
    # (expansion, width, repeats, stride); expansion None = the model's ``expand_ratio``
    SETTINGS = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )
    STAGE_ENDS = (1, 2, 4, 6)  # block groups whose outputs are stages (after the stem)

    def __init__(self, expand_ratio: int = 6, width_mult: float = 1.0, num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        c = int(32 * width_mult)
        self.conv1 = nn.Sequential(*conv_bn_relu(3, c, 3, stride=2))
        self.blocks = nn.ModuleList()
        for t, width, n, s in self.SETTINGS:
            width = int(width * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(c, width, s if i == 0 else 1, expand_ratio if t is None else t))
                c = width
            self.blocks.append(nn.Sequential(*group))
        self.embedding_dim = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*conv_bn_relu(c, self.embedding_dim, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.embedding_dim, num_classes)
        init_weights(self, linear_std=0.01)

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        keep = stages or preact
        x = self.conv1(x)
        maps = [x] if keep else []
        for i, group in enumerate(self.blocks):
            x = group(x)
            if keep and i in self.STAGE_ENDS:
                maps.append(x)
        return self.avgpool(self.conv2(x)).flatten(1), maps if stages else [], list(maps) if preact else []


@register_model
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(expand_ratio=6, width_mult=0.5, num_classes=num_classes)
