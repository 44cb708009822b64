"""ImageNet (ILSVRC-2012) from class folders on the user's disk, with the standard transforms.

torchvision cannot download ImageNet, so this reads ``<root>/train/<class>/*`` and
``<root>/val/<class>/*`` with ``ImageFolder``. The official validation images come flat; sort them
into class folders first (e.g. with the widely used ``valprep.sh``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kdx.data.base import IndexedDataset, KDDataModule
from kdx.data.cifar import DatasetNotFoundError, image_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(KDDataModule):
    """Train: RandomResizedCrop(224) + flip; eval: Resize(256) + CenterCrop(224).

    The test split is the validation split (ImageNet's test labels are not public), so the
    reported figures are ImageNet-val accuracy, as in every KD paper.
    """

    name = "imagenet"
    augment = True  # RandomResizedCrop + flip, which kdx cannot replay: no teacher.cache=views

    def __init__(
        self,
        root: str,
        num_classes: int = 1000,
        image_size: int = 224,
        resize_size: int = 256,
        **loader_kwargs: Any,
    ):
        super().__init__(**loader_kwargs)
        self.root = Path(root).expanduser()
        self.num_classes = int(num_classes)
        self.image_size, self.resize_size = int(image_size), int(resize_size)
        self.input_shape = (3, self.image_size, self.image_size)

    def _not_found(self, why: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"ImageNet not found in {self.root} ({why}): expected {self.root}/train/<class>/*.JPEG and "
            f"{self.root}/val/<class>/*.JPEG; download ILSVRC-2012 from image-net.org, sort val/ into "
            f"class folders, and point dataset.datamodule.root (or KDX_DATA_DIR) at it"
        )

    def _folder(self, split: str, transform):
        # torchvision on use: importing kdx.data must not need it
        from torchvision.datasets import ImageFolder

        folder = self.root / split
        if not folder.is_dir():
            raise self._not_found(f"no {split}/ folder")
        try:
            return ImageFolder(str(folder), transform=transform)
        except FileNotFoundError:  # no class folder, or no image in them
            raise self._not_found(f"no images in class folders under {split}/") from None

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise self._not_found(f"no {split}/ folder")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision.transforms import v2  # torchvision on use: importing kdx.data must not need it

        train_tf = image_transform(
            IMAGENET_MEAN, IMAGENET_STD, v2.RandomResizedCrop(self.image_size), v2.RandomHorizontalFlip()
        )
        train = self._folder("train", train_tf)
        val = self._folder("val", self._eval_transform())
        if train.classes != val.classes:
            raise ValueError(
                f"ImageNet: train/ and val/ under {self.root} have different class folders "
                f"({len(train.classes)} vs {len(val.classes)})"
            )
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"ImageNet: {self.root}/train has {len(train.classes)} class folders, but "
                f"num_classes={self.num_classes}"
            )
        self.train_set = IndexedDataset(train)
        self.val_set = self.test_set = IndexedDataset(val)
        self.note_examples()

    def _eval_transform(self):
        from torchvision.transforms import v2  # torchvision on use: importing kdx.data must not need it

        return image_transform(
            IMAGENET_MEAN, IMAGENET_STD, v2.Resize(self.resize_size), v2.CenterCrop(self.image_size)
        )

    def train_eval_dataloader(self):
        """The training split in order, with the evaluation transform (for PCA, class centres...)."""
        if self.train_set is None:
            return super().train_eval_dataloader()
        plain = copy.copy(self.train_set.base)  # shares the file list: no second scan of train/
        plain.transform = self._eval_transform()
        return self._loader(IndexedDataset(plain), train=False)
