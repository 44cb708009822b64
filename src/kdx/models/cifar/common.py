"""Pieces shared by the CIFAR zoo: weight init and the channel shuffle of the ShuffleNets."""

from __future__ import annotations

from torch import Tensor, nn


def init_weights(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """The RepDistiller initialisation: He-normal (fan-out) convs, BN at (1, 0).

    ``linear_std`` draws the classifier from N(0, std) with a zero bias (VGG, MobileNetV2);
    ``zero_linear_bias`` only zeroes its bias (WRN); otherwise PyTorch's default is kept.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` channel groups, so grouped convs see every group (ShuffleNet)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
