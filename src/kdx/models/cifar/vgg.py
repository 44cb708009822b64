"""CIFAR VGG-BN of the CRD benchmark: vgg8, vgg11, vgg13, vgg16, vgg19.

Five conv blocks (3×3 conv with bias, BN, ReLU) of 64, 128, 256, 512, 512 channels, 2×2 max-pools
between the first four, global average pooling, one linear layer (no FC stack). As in RepDistiller,
blocks 4 and 5 both run at 4×4 on 32×32 inputs (the fourth pool is used only for 64×64 inputs).
Stages: the five block outputs (post-ReLU). Pre-activation stages (RepDistiller's ``preact=True``):
the first block's output as it is (post-ReLU), then blocks 2–5 at their last conv-BN, before the
ReLU. Module names follow RepDistiller's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdx.models.catalog import register_model
from kdx.models.cifar.common import PreactStagesModel, init_weights

# conv widths per block; vgg8 is RepDistiller's configuration "S"
_CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(c_in: int, widths: Sequence[int]) -> nn.Sequential:
    """conv-BN-ReLU repeated; the last ReLU is left to ``forward`` (it reads the pre-activation)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c_in = w
    return nn.Sequential(*layers[:-1])


class VGG(PreactStagesModel):
    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        c_in = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _block(c_in, widths))
            c_in = widths[-1]
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.relu = nn.ReLU()
        self.embedding_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)
        init_weights(self, linear_std=0.01)

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        big = x.shape[-2] >= 64
        maps, pre = [], []
        for i in range(5):
            h = getattr(self, f"block{i}")(x)
            x = self.relu(h)  # not in place: ``h`` may be kept
            if stages:
                maps.append(x)
            if preact:
                pre.append(x if i == 0 else h)
            if i < 3 or (i == 3 and big):
                x = getattr(self, f"pool{i}")(x)
        return self.pool4(x).flatten(1), maps, pre


@register_model
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg8"], num_classes)


@register_model
def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg11"], num_classes)


@register_model
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg13"], num_classes)


@register_model
def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg16"], num_classes)


@register_model
def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg19"], num_classes)
