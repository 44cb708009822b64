"""CIFAR-10 / CIFAR-100 through torchvision's loaders, with the CRD / RepDistiller protocol.

Nothing is downloaded unless ``download=true`` is asked for: kdx must run on machines without
internet, and a missing data set should be one readable line, not torchvision's advice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdx.data.base import IndexedDataset, KDDataModule, dataset_targets
from kdx.data.replay import CropFlipReplay, ReplayableViews
from kdx.errors import DatasetNotFoundError


class TransformedSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` on the input.

    Lets the training split and a held-out validation split share one copy of the arrays while
    only the training split is augmented.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[self.indices[i]]
        return self.transform(x), y

    @property
    def targets(self) -> Tensor:
        return dataset_targets(self.base)[torch.as_tensor(self.indices, dtype=torch.long)]


def image_transform(mean: Sequence[float], std: Sequence[float], *augment: Callable) -> Callable:
    """PIL image → normalised float tensor, after the given (PIL or uint8) augmentations."""
    from torchvision.transforms import v2  # torchvision on use: importing kdx.data must not need it

    return v2.Compose(
        [
            v2.ToImage(),
            *augment,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor(),
        ]
    )


class _CIFARDataModule(KDDataModule):
    """Train: RandomCrop(32, padding=4) + horizontal flip; all splits normalised per channel.

    Validation is the test set by default (``val_fraction=0``), as in RepDistiller/CRD and the
    tables they publish; "best epoch" figures are then selected on the test set, exactly like theirs.
    ``val_fraction > 0`` holds out that share of the training set instead (fixed ``seed``, no
    augmentation on it) for honest model selection.
    """

    torchvision_class: str
    title: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_shape = (3, 32, 32)

    def __init__(
        self,
        root: str,
        download: bool = False,
        val_fraction: float = 0.0,
        seed: int = 0,
        augment: bool = True,
        **loader_kwargs: Any,
    ):
        super().__init__(**loader_kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{type(self).__name__}: val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root).expanduser()
        self.download = download
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment

    def _dataset_class(self):
        import torchvision.datasets  # torchvision on use: importing kdx.data must not need it

        return getattr(torchvision.datasets, self.torchvision_class)

    def _check_files(self) -> None:
        cls = self._dataset_class()
        folder = self.root / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"{self.title} not found in {folder} (missing {', '.join(missing)}): run once with "
                f"dataset.datamodule.download=true on a machine with internet, or copy the extracted "
                f"{cls.base_folder}/ folder into {self.root}"
            )

    def _load(self, train: bool):
        try:
            return self._dataset_class()(str(self.root), train=train, download=False)
        except RuntimeError:  # torchvision's "not found or corrupted": the files exist, so their md5 failed
            folder = self.root / self._dataset_class().base_folder
            raise DatasetNotFoundError(
                f"{self.title} files in {folder} failed torchvision's checksum check (corrupt or partial "
                f"copy): replace them, or delete them and run with dataset.datamodule.download=true"
            ) from None

    def prepare_data(self) -> None:
        if self.download:
            cls = self._dataset_class()
            cls(str(self.root), train=True, download=True)
            cls(str(self.root), train=False, download=True)
        self._check_files()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_files()
        train, test = self._load(train=True), self._load(train=False)
        from torchvision.transforms import v2  # torchvision on use: importing kdx.data must not need it

        augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if self.augment else []
        train_tf, eval_tf = (
            image_transform(self.mean, self.std, *augment),
            image_transform(self.mean, self.std),
        )
        self.test_set = IndexedDataset(TransformedSubset(test, None, eval_tf))
        if self.val_fraction > 0:
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, round(self.val_fraction * len(train)))
            self.train_set = IndexedDataset(TransformedSubset(train, perm[n_val:], train_tf))
            self.val_set = IndexedDataset(TransformedSubset(train, perm[:n_val], eval_tf))
        else:
            self.train_set = IndexedDataset(TransformedSubset(train, None, train_tf))
            self.val_set = self.test_set
        self.note_examples()

    def replayable_views(self) -> ReplayableViews | None:
        """``teacher.cache=views``: the training split's raw items and RandomCrop(32, padding=4) + flip
        in replayable form; None without augmentation (a deterministic view: ``teacher.cache=exact``)."""
        if not self.augment:
            return None
        subset: TransformedSubset = self._built(self.train_set).base  # type: ignore[attr-defined]
        return ReplayableViews(subset.base, subset.indices, CropFlipReplay(32, 4, self.mean, self.std))

    def train_eval_dataloader(self):
        """The training split in order and without augmentation (for PCA, class centres...)."""
        if self.train_set is None:
            return super().train_eval_dataloader()
        subset: TransformedSubset = self.train_set.base  # type: ignore[assignment]
        plain = IndexedDataset(
            TransformedSubset(subset.base, subset.indices, image_transform(self.mean, self.std))
        )
        return self._loader(plain, train=False)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 from ``<root>/cifar-10-batches-py/`` (torchvision's layout); protocol as in the base."""

    name = "cifar10"
    title = "CIFAR-10"
    torchvision_class = "CIFAR10"
    num_classes = 10
    # CIFAR-10's own training-set statistics (the std often quoted, 0.2023/0.1994/0.2010, is not
    # the per-pixel std of the data)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 from ``<root>/cifar-100-python/`` (torchvision's layout); protocol as in the base."""

    name = "cifar100"
    title = "CIFAR-100"
    torchvision_class = "CIFAR100"
    num_classes = 100
    mean = (0.5071, 0.4867, 0.4408)  # as in RepDistiller / CRD
    std = (0.2675, 0.2565, 0.2761)
