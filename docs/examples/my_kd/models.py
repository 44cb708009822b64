"""A plain ``nn.Module`` classifier: nothing kdx-specific in it.

kdx reads what a method asks for through hooks: the logits are ``forward``'s output, the
embedding is the input of the last ``nn.Linear`` (here ``head``), stages are named module paths
(``student.stage_names=[features.0,features.3]``) when a method reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class TinyConv1d(nn.Module):
    """Two 1-D convolutions, global average pooling, a linear head; for (C, L) or (L,) signals."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], channels: int = 16):
        super().__init__()
        # kdx checks this against dataset.num_classes before training, when the model has it
        self.num_classes = num_classes
        in_channels = int(input_shape[0]) if len(input_shape) == 2 else 1
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, kernel_size=5, padding=2),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # (B, L) -> (B, 1, L)
            x = x.unsqueeze(1)
        return self.head(self.features(x))
