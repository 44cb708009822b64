"""Small models for the CPU data sets (MNIST-1D, digits, synthetic vectors).

``CNN1D`` is the MNIST-1D teacher (three 1-D conv stages, global average pooling), ``MLP`` the
student. Both accept any input shape: ``CNN1D`` reads a (C, L) signal and flattens anything with
more axes into one long signal, ``MLP`` flattens everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from kdx.models.base import KDModel, run_stages


class MLP(KDModel):
    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (100, 100),
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        width = math.prod(input_shape)
        self.blocks = nn.ModuleList()
        for h in hidden:
            block = nn.Sequential(nn.Linear(width, h), nn.ReLU(inplace=True))
            if dropout:
                block.append(nn.Dropout(dropout))
            self.blocks.append(block)
            width = h
        self.embedding_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor, stages: bool = False) -> tuple[Tensor, list[Tensor]]:
        h = x.flatten(1)
        maps = []
        h = run_stages(h, self.blocks, stages, maps)
        return h, maps


class CNN1D(KDModel):
    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 5,
    ):
        super().__init__()
        self.num_classes = num_classes
        in_ch = input_shape[0] if len(input_shape) == 2 else 1
        self.stages = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.stages.append(
                nn.Sequential(
                    nn.Conv1d(
                        in_ch,
                        ch,
                        kernel_size,
                        stride=1 if i == 0 else 2,
                        padding=kernel_size // 2,
                        bias=False,
                    ),
                    nn.BatchNorm1d(ch),
                    nn.ReLU(inplace=True),
                    nn.Conv1d(ch, ch, 3, padding=1, bias=False),
                    nn.BatchNorm1d(ch),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch = ch
        self.embedding_dim = in_ch
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward_features(self, x: Tensor, stages: bool = False) -> tuple[Tensor, list[Tensor]]:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        elif x.dim() > 3:
            x = x.flatten(1).unsqueeze(1)
        maps = []
        x = run_stages(x, self.stages, stages, maps)
        return self.pool(x).flatten(1), maps
