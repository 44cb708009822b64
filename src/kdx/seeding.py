"""Reproducible draws from ``(seed, a, b)``: one SplitMix64 mix, vectorised in numpy and the same per item.

Every seeded draw in kdx that must not depend on how much global RNG was used before it goes
through :func:`mix`: augmentation replay (which view, which crop), CRD's negatives per (seed, step,
rank), backward KD's auxiliary set per (run seed, epoch, rank). Each use passes its own ``salt`` so
that two uses with equal arguments draw independently.
"""

from __future__ import annotations

import numpy as np

# One salt per use, so that equal (seed, a, b) give independent draws.
SALT_REPLAY_VIEW = 1
SALT_REPLAY_CROP = 2
SALT_CRD_NEGATIVES = 3
SALT_BACKWARD_AUX = 4

_MASK = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def mix(seed: int, a: int | np.ndarray, b: int | np.ndarray, salt: int = 0) -> np.ndarray:
    """A 64-bit hash of ``(seed, a, b, salt)``; ``a``/``b`` may be arrays (broadcast)."""
    h = _splitmix(np.asarray(seed, dtype=np.uint64) ^ np.uint64(salt))
    h = _splitmix(h ^ np.asarray(a, dtype=np.int64).astype(np.uint64))
    return _splitmix(h ^ np.asarray(b, dtype=np.int64).astype(np.uint64))


def generator_seed(seed: int, a: int, b: int, salt: int) -> int:
    """A seed for ``torch.Generator.manual_seed`` from ``(seed, a, b, salt)``: non-negative, 63 bits."""
    return int(mix(int(seed) & 0xFFFF_FFFF_FFFF_FFFF, a, b, salt)) & 0x7FFF_FFFF_FFFF_FFFF
