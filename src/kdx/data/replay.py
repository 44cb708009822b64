"""Replaying an augmented view: view ``v`` of example ``i`` is the same tensor whenever it is built.

Random augmentation makes every read of a training example a new input, so a frozen teacher's
outputs on it cannot be stored. Drawing the augmentation's parameters from ``(seed, index, view)``
instead of a global random stream turns each example into a fixed number of views that can be
rebuilt bit for bit: the teacher-output cache (:mod:`kdx.teacher_outputs`) stores the teacher's
outputs per view, and the data module trains on the same views
(:meth:`kdx.data.base.KDDataModule.train_on_views`). In epoch ``e`` example ``i`` is shown as view
``view_of(seed, e, i, views)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdx.seeding import SALT_REPLAY_CROP, SALT_REPLAY_VIEW, mix


def view_of(seed: int, epoch: int, index: int | np.ndarray, views: int) -> np.ndarray:
    """Which of the ``views`` stored views example ``index`` is shown as in ``epoch``."""
    return (mix(seed, epoch, index, salt=SALT_REPLAY_VIEW) % np.uint64(views)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Augmentations in replayable form


class Replay(Protocol):
    """An augmentation whose random parameters come from ``(seed, index, view)``."""

    def describe(self) -> dict[str, Any]:
        """Everything that decides the views' pixels (part of the teacher-output cache's key)."""
        ...

    def params(self, seed: int, index: int, view: int) -> Any: ...

    def __call__(self, image: Any, params: Any) -> Tensor: ...


class CropFlipReplay:
    """RandomCrop(size, padding) + horizontal flip whose parameters come from ``(seed, index, view)``.

    ``params`` gives ``(top, left, flip)``; ``__call__`` applies them to a PIL image or a ``(C, H, W)``
    uint8 tensor and normalises like :func:`kdx.data.cifar.image_transform`, so view ``v`` of
    example ``i`` is the same tensor, bit for bit, whenever it is built.
    """

    def __init__(
        self, size: int, padding: int, mean: Sequence[float], std: Sequence[float], flip: bool = True
    ):
        self.size, self.padding, self.flip = int(size), int(padding), bool(flip)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def describe(self) -> dict[str, Any]:
        return {
            "replay": "crop_flip",
            "size": self.size,
            "padding": self.padding,
            "flip": self.flip,
            "mean": self.mean,
            "std": self.std,
        }

    def params(self, seed: int, index: int, view: int) -> tuple[int, int, bool]:
        h = int(mix(seed, index, view, salt=SALT_REPLAY_CROP))
        span = 2 * self.padding + 1  # crop offsets 0 .. 2·padding in the padded image
        return (h % span, (h // span) % span, self.flip and bool((h // (span * span)) & 1))

    def __call__(self, image: Any, params: tuple[int, int, bool]) -> Tensor:
        # torchvision is imported on use: importing kdx.data must not need it
        from torchvision.transforms.v2 import functional as TF

        top, left, flip = params
        x = TF.to_image(image) if not isinstance(image, Tensor) else image
        x = TF.pad(x, [self.padding])  # zero padding, as v2.RandomCrop(padding=p)
        x = TF.crop(x, top, left, self.size, self.size)
        if flip:
            x = TF.horizontal_flip(x)
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std)).as_subclass(Tensor)


class ReplayableViews(NamedTuple):
    """What a data module hands over for view replay: the training split's raw (un-augmented) items,
    training example ``i`` being ``base[indices[i]]``, and its augmentation in replayable form."""

    base: Dataset
    indices: Sequence[int]
    replay: Replay


class ViewReplayDataset(Dataset):
    """Items keyed by ``index * views + view``: ``(view `view` of example `index`, y, index)``."""

    def __init__(self, base: Dataset, indices: Sequence[int], replay: Replay, views: int, seed: int):
        self.base, self.indices, self.replay = base, list(indices), replay
        self.views, self.seed = int(views), int(seed)

    @property
    def examples(self) -> int:
        """The number of training examples (each stored as ``views`` items)."""
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices) * self.views

    def item(self, index: int, view: int) -> tuple[Tensor, int, int]:
        image, y = self.base[self.indices[index]][:2]
        return self.replay(image, self.replay.params(self.seed, index, view)), y, index

    def __getitem__(self, key: int):
        return self.item(*divmod(int(key), self.views))
