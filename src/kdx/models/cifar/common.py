"""Pieces shared by the CIFAR zoo: weight init, the channel shuffle of the ShuffleNets, and the
plumbing of pre-activation stages (RepDistiller's ``preact=True``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from kdx.models.base import KDModel


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


class PreactStagesModel(KDModel):
    """A zoo model that defines pre-activation stages: subclasses implement one pass,
    ``_features(x, stages, preact) -> (embedding, [stage maps], [pre-activation maps])``, that
    computes each list only when its flag is set (a plain forward pays nothing for either)."""

    def _features(self, x: Tensor, stages: bool, preact: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def forward_features(self, x: Tensor, stages: bool = False) -> tuple[Tensor, list[Tensor]]:
        embedding, maps, _ = self._features(x, stages, False)
        return embedding, maps

    def forward_preact_features(
        self, x: Tensor, stages: bool = False
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        return self._features(x, stages, True)


def run_stages_preact(
    x: Tensor, layers: Iterable[nn.Sequential], maps: list[Tensor] | None, preact: list[Tensor] | None
) -> Tensor:
    """Apply the stages ``layers`` in order, appending each output to ``maps`` and, when ``preact``
    is a list, each stage's pre-activation output to it: its last block then runs through
    ``forward_preact(x) -> (output, pre-activation output)``."""
    for layer in layers:
        if preact is None:
            x = layer(x)
        else:
            *head, last = layer
            for block in head:
                x = block(x)
            x, pre = last.forward_preact(x)
            preact.append(pre)
        if maps is not None:
            maps.append(x)
    return x
