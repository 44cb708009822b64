"""The order of the training examples: a function of (seed, epoch) only.

Lightning calls ``set_epoch`` on any sampler that has it, so a run resumed from a checkpoint sees
exactly the batches the uninterrupted run would have seen (the default ``RandomSampler`` draws from
the global RNG, whose state a checkpoint does not hold). Text data trains on batches of similar
length (:class:`LengthGroupedBatchSampler`) through a loader that also resumes mid-epoch
(:class:`ResumableLoader`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Sampler

from kdx.data.replay import view_of
from kdx.seeding import SALT_LENGTH_GROUPS, epoch_seed, mix


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


def _cut(order: list[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of examples of similar length, drawn from ``(seed, epoch)`` alone.

    The recipe: take the order of ``sampler`` (:class:`EpochSeededSampler`; under DDP the
    ``DistributedSampler`` Lightning injects in its place, one shard per rank), cut it into chunks of
    ``chunk_batches`` batches, sort each chunk by length (stable), cut it into batches, then shuffle
    the order of all the epoch's batches. Padding then costs little (every batch is trimmed to its
    longest row) while each batch still mixes examples from all over the split. ``group=False`` is
    the plain shuffled batching: consecutive cuts of the sampler's order (what ``DataLoader(sampler=,
    batch_size=)`` gives). The number of batches is a plain cut's: every example exactly once per
    epoch, the same count on every rank.

    ``skip``: batches of the next epoch to leave out (a resumed epoch; :class:`ResumableLoader` sets it).
    Lightning calls ``set_epoch`` on ``self.sampler``; the epoch is read from there.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        lengths: Tensor | None = None,
        seed: int = 0,
        group: bool = True,
        chunk_batches: int = 64,
    ):
        super().__init__(sampler, batch_size, drop_last)
        if group and lengths is None:
            raise ValueError("length grouping needs the examples' lengths")
        if chunk_batches < 1:
            raise ValueError(f"chunk_batches={chunk_batches} must be >= 1")
        self.lengths = None if lengths is None else torch.as_tensor(lengths).long()
        self.seed, self.group, self.chunk_batches = int(seed), bool(group), int(chunk_batches)
        self.skip = 0

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def epoch_batches(self) -> list[list[int]]:
        """Every batch of the current epoch, in order."""
        order = [int(i) for i in self.sampler]
        if not self.group:
            return _cut(order, self.batch_size, self.drop_last)
        assert self.lengths is not None
        chunk = self.chunk_batches * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = torch.tensor(order[start : start + chunk], dtype=torch.long)
            ranked = part[torch.argsort(self.lengths[part], stable=True)].tolist()
            batches.extend(_cut(ranked, self.batch_size, drop_last=False))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()  # only the last chunk's last batch can be short
        seed = int(mix(self.seed, self.epoch, 0, salt=SALT_LENGTH_GROUPS)) >> 1  # a 63-bit generator seed
        generator = torch.Generator().manual_seed(seed)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        # a generator: the order is drawn at the first batch, after Lightning's set_epoch
        skip, self.skip = self.skip, 0
        yield from self.epoch_batches()[skip:]


class ResumableLoader(DataLoader):
    """A training loader over a :class:`LengthGroupedBatchSampler` whose place in the epoch is saved in
    Lightning's checkpoints (Lightning saves ``state_dict()`` of a loader that has one): a run resumed
    from a mid-epoch checkpoint trains on exactly the batches the uninterrupted run had left.

    The place is the number of batches handed to the loop in this epoch, which is the loop's count of
    finished steps wherever kdx or Lightning saves a checkpoint (after a step; a signal stops the loop
    between steps)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.served = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self):
        # a generator, so that the epoch is read at the first batch (after Lightning's set_epoch)
        batches: LengthGroupedBatchSampler = self.batch_sampler  # type: ignore[assignment]
        skip = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == batches.epoch and 0 < done < len(batches):
                skip = done
        batches.skip = self.served = skip
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches": self.served}  # type: ignore[union-attr]

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
