"""Seeded synthetic classification data: instant, any shape, with a known ground truth.

``SyntheticDataModule`` lets any model (including the CIFAR zoo, with ``input_shape=(3, 32, 32)``)
run end to end in a test in seconds. ``HierSyntheticDataModule`` gives classes a known two-level
hierarchy, so a diagnostic can check whether what a teacher "knows" about class similarity (the
domain-level knowledge of Tang et al., 2020, "Understanding and Improving Knowledge Distillation")
matches the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdx.data.base import KDDataModule, tensor_dataset


def _balanced_labels(n: int, num_classes: int, g: torch.Generator) -> Tensor:
    """Every class gets n // K or n // K + 1 samples, in random order."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


class _SplitTensors(KDDataModule):
    """Generates one pool of samples in ``setup`` and cuts it into train/val/test by counts."""

    def __init__(self, num_train: int, num_val: int, num_test: int, seed: int, **loader_kwargs: Any):
        super().__init__(**loader_kwargs)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.seed = seed

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # its own generator (offset from the one that drew the class centres): the global RNG and
        # the run's training seed never change the data
        g = torch.Generator().manual_seed(self.seed + 1)
        x, y = self._sample(self.num_train + self.num_val + self.num_test, g)
        a, b = self.num_train, self.num_train + self.num_val
        self.train_set = tensor_dataset(x[:a], y[:a])
        self.val_set = tensor_dataset(x[a:b], y[a:b])
        self.test_set = tensor_dataset(x[b:], y[b:])
        self.note_examples()


class SyntheticDataModule(_SplitTensors):
    """Isotropic Gaussian classes: ``x = class_sep * mu_y + noise * eps`` with ``mu_y, eps ~ N(0, I)``.

    Two class means differ by about ``class_sep * sqrt(2 d)`` in d dimensions, so the task is
    learnable for any shape; lower ``class_sep`` (or raise ``noise``) for a harder one.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32,),
        num_classes: int = 10,
        num_train: int = 2000,
        num_val: int = 500,
        num_test: int = 500,
        class_sep: float = 0.75,
        noise: float = 1.0,
        seed: int = 0,
        name: str = "synthetic",
        **loader_kwargs: Any,
    ):
        super().__init__(num_train, num_val, num_test, seed, **loader_kwargs)
        self.name = name  # e.g. "synthetic_cifar"
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.noise = noise
        g = torch.Generator().manual_seed(seed)
        self.class_means = class_sep * torch.randn(self.num_classes, *self.input_shape, generator=g)

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        y = _balanced_labels(n, self.num_classes, g)
        return self.class_means[y] + self.noise * torch.randn(n, *self.input_shape, generator=g), y


class HierSyntheticDataModule(_SplitTensors):
    """``num_super`` super-classes × ``sub_per_super`` sub-classes; the label is the sub-class.

    Generative model in ``dim`` dimensions (all draws isotropic Gaussian, seeded):
    super-class centre ~ N(0, super_spread²), sub-class centre ~ its super centre + N(0, sub_spread²),
    each sub-class is an equal mixture of ``modes_per_sub`` modes ~ its centre + N(0, mode_spread²),
    and a sample is its mode + N(0, noise²). With ``super_spread >> sub_spread`` sub-classes of one
    super-class are near each other and far from the rest, which ``true_class_similarity`` reports.
    """

    name = "hier_synthetic"

    def __init__(
        self,
        num_super: int = 5,
        sub_per_super: int = 4,
        dim: int = 32,
        modes_per_sub: int = 3,
        super_spread: float = 3.0,
        sub_spread: float = 0.6,
        mode_spread: float = 0.3,
        noise: float = 1.0,
        num_train: int = 4000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        **loader_kwargs: Any,
    ):
        super().__init__(num_train, num_val, num_test, seed, **loader_kwargs)
        self.num_super, self.sub_per_super, self.modes_per_sub = num_super, sub_per_super, modes_per_sub
        self.num_classes = num_super * sub_per_super
        self.input_shape = (int(dim),)
        self.noise = noise
        g = torch.Generator().manual_seed(seed)
        # class_hierarchy[k] = super-class of sub-class k
        self.class_hierarchy = torch.arange(self.num_classes) // sub_per_super
        supers = super_spread * torch.randn(num_super, dim, generator=g)
        subs = supers[self.class_hierarchy] + sub_spread * torch.randn(self.num_classes, dim, generator=g)
        # mode_centres: (num_classes, modes_per_sub, dim)
        self.mode_centres = subs[:, None] + mode_spread * torch.randn(
            self.num_classes, modes_per_sub, dim, generator=g
        )
        # the true mean of each sub-class's mixture
        self.class_means = self.mode_centres.mean(1)

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        y = _balanced_labels(n, self.num_classes, g)
        mode = torch.randint(self.modes_per_sub, (n,), generator=g)
        x = self.mode_centres[y, mode] + self.noise * torch.randn(n, self.input_shape[0], generator=g)
        return x, y

    def true_class_similarity(self) -> Tensor:
        """(K, K) cosine similarity of the sub-class means, centred on their average.

        Centring removes the direction all classes share, so unrelated classes score near 0 rather
        than sharing an offset; the result is comparable with a learnt similarity (e.g. of classifier
        weights or class-mean embeddings, after the same centring).
        """
        m = self.class_means - self.class_means.mean(0, keepdim=True)
        m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return m @ m.T

    def super_class_of(self, y: Tensor) -> Tensor:
        return self.class_hierarchy.to(y.device)[y]
