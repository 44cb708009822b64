"""The order of the training examples: a function of (seed, epoch) only.

Lightning calls ``set_epoch`` on any sampler that has it, so a run resumed from a checkpoint sees
exactly the batches the uninterrupted run would have seen (the default ``RandomSampler`` draws from
the global RNG, whose state a checkpoint does not hold).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Sampler

from kdx.data.replay import view_of
from kdx.seeding import epoch_seed


def epoch_permutation(size: int, seed: int, epoch: int) -> Tensor:
    """A permutation of ``range(size)`` drawn from ``(seed, epoch)`` alone."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(size, generator=generator)


class EpochSeededSampler(Sampler[int]):
    """Shuffles ``range(size)`` in the order :func:`epoch_permutation` gives for the current epoch."""

    def __init__(self, size: int, seed: int):
        self.size = int(size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_permutation(self.size, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.size


class ViewSampler(Sampler[int]):
    """The order of :class:`EpochSeededSampler` over ``size`` examples, each example as its epoch's
    view: yields the keys ``index * views + view_of(seed, epoch, index, views)`` of a
    :class:`~kdx.data.replay.ViewReplayDataset`."""

    def __init__(self, size: int, views: int, seed: int, order_seed: int):
        self.size, self.views, self.seed, self.order_seed, self.epoch = size, views, seed, order_seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = epoch_permutation(self.size, self.order_seed, self.epoch).numpy()
        keys = order * self.views + view_of(self.seed, self.epoch, order, self.views)
        return iter(keys.tolist())

    def __len__(self) -> int:
        return self.size
