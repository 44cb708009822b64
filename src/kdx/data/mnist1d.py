"""MNIST-1D (Greydanus 2020): the default data set, generated locally, never downloaded.

The ``mnist1d`` package builds the data procedurally from a handful of templates. Generating
10 000 samples takes a couple of seconds, so the arrays are cached once per generator setting under
``<cache_dir>/mnist1d/mnist1d-<hash>.pt`` and every later run (and every DDP rank) just loads them,
after checking them against their record ``mnist1d-<hash>.pt.json`` (:mod:`kdx.data.cache`: a
damaged file is moved aside and generated again).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdx.data.base import KDDataModule, tensor_dataset
from kdx.data.cache import load_or_build
from kdx.utils import stable_hash

_FORMAT = 1  # bump when the cached file's layout changes, so stale caches are not reused


class MNIST1DDataModule(KDDataModule):
    """MNIST-1D: mnist1d's own train part split into train/val, mnist1d's test part as test.

    ``generator_args`` overrides further fields of ``mnist1d.data.get_dataset_args()`` (noise
    scales, ``shuffle_seq``...). ``seed`` fixes both the generator and the train/val split, so
    every run of a sweep sees the same data whatever its training seed.
    """

    name = "mnist1d"
    num_classes = 10
    input_shape = (1, 40)

    def __init__(
        self,
        cache_dir: str,
        num_samples: int = 5000,
        val_fraction: float = 0.1,
        seed: int = 42,
        generator_args: dict[str, Any] | None = None,
        **loader_kwargs: Any,
    ):
        super().__init__(**loader_kwargs)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"MNIST1DDataModule: val_fraction must be in (0, 1), got {val_fraction}")
        self.cache_dir = Path(cache_dir)
        self.num_samples = num_samples
        self.val_fraction = val_fraction
        self.seed = seed
        self.generator_args = dict(generator_args or {})

    def _args(self):
        from mnist1d.data import get_dataset_args  # mnist1d on use: importing kdx.data must not need it

        args = get_dataset_args()
        for key, value in {**self.generator_args, "num_samples": self.num_samples, "seed": self.seed}.items():
            if not hasattr(args, key):
                raise ValueError(f"MNIST1DDataModule: mnist1d has no generator argument {key!r}")
            setattr(args, key, value)
        return args

    @property
    def cache_path(self) -> Path:
        # `url` only says where the published pickle lives; it does not change the data.
        key = {k: v for k, v in vars(self._args()).items() if k != "url"}
        return self.cache_dir / "mnist1d" / f"mnist1d-{stable_hash({'format': _FORMAT, **key})}.pt"

    def _generate(self) -> dict:
        import mnist1d.data  # mnist1d on use: importing kdx.data must not need it

        args = self._args()
        # make_dataset reseeds the global `random` and numpy generators; put them back so that
        # building the data does not change the run's own random stream.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = mnist1d.data.make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return {
            "format": _FORMAT,
            "x": torch.as_tensor(data["x"], dtype=torch.float32),
            "y": torch.as_tensor(data["y"], dtype=torch.int64),
            "x_test": torch.as_tensor(data["x_test"], dtype=torch.float32),
            "y_test": torch.as_tensor(data["y_test"], dtype=torch.int64),
        }

    def _data(self) -> dict:
        """The generated arrays, from the checked cache (:func:`kdx.data.cache.load_or_build`)."""
        return load_or_build(self.cache_path, self._generate, what="MNIST-1D")

    def prepare_data(self) -> None:
        self._data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self._data()  # checked and loaded; generated when prepare_data was skipped
        x, y = data["x"].unsqueeze(1), data["y"]
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(self.val_fraction * len(y)))
        val, train = perm[:n_val], perm[n_val:]
        self.train_set = tensor_dataset(x[train], y[train])
        self.val_set = tensor_dataset(x[val], y[val])
        self.test_set = tensor_dataset(data["x_test"].unsqueeze(1), data["y_test"])
        self.note_examples()
