"""What every kdx data module shares: ``(x, y, index)`` batches and a declared shape.

A data module subclasses :class:`KDDataModule`, sets ``num_classes`` and ``input_shape`` and
builds ``self.train_set`` / ``self.val_set`` / ``self.test_set`` in ``setup``; the loaders and the
index wrapping live here once.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(x, y)`` so that each item is ``(x, y, index)``."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index][:2]
        return x, y, index


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch).

    Lightning calls ``set_epoch`` on any sampler that has it, so a run resumed from a checkpoint
    sees exactly the batches the uninterrupted run would have seen (the default ``RandomSampler``
    draws from the global RNG, whose state a checkpoint does not hold).
    """

    def __init__(self, data_source: Dataset, seed: int):
        self.size = len(data_source)  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # modulo 2**63: an unseeded torch.initial_seed() is a full 64-bit number (same value for real seeds)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (1 << 63))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def tensor_dataset(x: Tensor, y: Tensor) -> IndexedDataset:
    return IndexedDataset(TensorDataset(x, y.long()))


class KDDataModule(L.LightningDataModule):
    num_classes: int
    input_shape: tuple[int, ...]
    name: str = "dataset"
    collate_fn = None  # None: PyTorch's default collate

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            # the run's seed (seed_everything sets it before the data module is built)
            sampler=EpochSeededSampler(dataset, torch.initial_seed()) if train else None,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,  # text data trims each batch's padding (kdx.data.text)
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def train_eval_dataloader(self) -> DataLoader:
        """The training split in order, without shuffling (for fitting PCA, class centres...)."""
        return self._loader(self.train_set, train=False)
