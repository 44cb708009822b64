"""kdx data modules; every batch is ``(x, y, index)``.

Every data module subclasses :class:`kdx.data.base.KDDataModule`, which declares what the rest of
kdx reads from it (the data protocol); :mod:`kdx.data.replay` replays augmented views for the
teacher-output cache.

Configs name the full path (``kdx.data.cifar.CIFAR100DataModule``); the names below are loaded on
first use so that importing ``kdx.data`` does not import torchvision, scikit-learn or mnist1d.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KDDataModule": "base",
    "IndexedDataset": "base",
    "tensor_dataset": "base",
    "MNIST1DDataModule": "mnist1d",
    "DigitsDataModule": "digits",
    "SyntheticDataModule": "synthetic",
    "HierSyntheticDataModule": "synthetic",
    "CIFAR10DataModule": "cifar",
    "CIFAR100DataModule": "cifar",
    "DatasetNotFoundError": "cifar",
    "ImageNetDataModule": "imagenet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdx.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kdx.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
