"""scikit-learn's 8×8 handwritten digits (1 797 images): a second tiny image task with no download."""

from __future__ import annotations

from typing import Any

import torch

from kdx.data.base import KDDataModule, tensor_dataset


class DigitsDataModule(KDDataModule):
    """Stratified, fixed-seed train/val/test split (70/10/20 by default).

    Pixels are scaled to [0, 1] (the raw values are 0..16), then standardised with one mean and one
    std taken from the training split only: a per-pixel std would be zero on the always-blank
    border pixels, and using val/test statistics would leak.
    """

    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, **loader_kwargs: Any
    ):
        super().__init__(**loader_kwargs)
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                "DigitsDataModule: need val_fraction > 0, test_fraction > 0 and their sum < 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # scikit-learn on use: only this data set needs it
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=self.test_fraction, stratify=y, random_state=self.seed
        )
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest,
            y_rest,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=y_rest,
            random_state=self.seed,
        )

        def to_tensor(a):
            return torch.as_tensor(a, dtype=torch.float32).div(16.0).reshape(-1, *self.input_shape)

        train = to_tensor(x_train)
        mean, std = train.mean(), train.std()
        self.train_set = tensor_dataset((train - mean) / std, torch.as_tensor(y_train))
        self.val_set = tensor_dataset((to_tensor(x_val) - mean) / std, torch.as_tensor(y_val))
        self.test_set = tensor_dataset((to_tensor(x_test) - mean) / std, torch.as_tensor(y_test))
        self.note_examples()
