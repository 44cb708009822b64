"""A data set of noisy sine waves, generated in memory: the class is the wave's frequency.

kdx's batch contract is ``(x, y, index)``: ``index`` is each example's position in its split
(methods such as backward-pass KD use it). Subclassing :class:`kdx.data.base.KDDataModule` gives
that, the loaders and the resumable shuffling; the subclass sets ``name``, ``num_classes``,
``input_shape`` and builds the three splits in ``setup``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdx.data.base import KDDataModule, tensor_dataset


class WavesDataModule(KDDataModule):
    """``x(t) = sin(2π·f_y·t/L + φ) + noise·ε`` for t = 0…L-1, f_y = y + 1 cycles per signal, random
    phase φ; shape ``(1, L)``."""

    name = "waves"

    def __init__(
        self,
        num_classes: int = 5,
        input_shape: Sequence[int] = (1, 40),
        num_train: int = 1000,
        num_val: int = 200,
        num_test: int = 200,
        noise: float = 0.5,
        seed: int = 0,
        **loader_kwargs: Any,
    ):
        super().__init__(**loader_kwargs)  # batch_size, num_workers, ...
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.sizes = (num_train, num_val, num_test)
        self.noise = noise
        self.seed = seed

    def _waves(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        length = self.input_shape[-1]
        y = torch.randint(0, self.num_classes, (n,), generator=generator)
        phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
        t = torch.arange(length, dtype=torch.float32)
        x = torch.sin(2 * math.pi * (y[:, None] + 1) * t / length + phase)
        x = x + self.noise * torch.randn(n, length, generator=generator)
        return x.reshape(n, *self.input_shape), y

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # Lightning calls setup once per stage
            return
        # the data set's own generator: the run's training seed never changes the data
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set, self.test_set = (
            tensor_dataset(*self._waves(n, generator)) for n in self.sizes
        )
