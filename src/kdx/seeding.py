"""Every seeded draw in kdx that must not depend on how much global RNG was used before it.

Each formula is written once, here, and each use names the one it draws from:

* :func:`mix` — a SplitMix64 hash of ``(seed, a, b, salt)``, vectorised in numpy: augmentation
  replay (which view of an example, which crop), where every item needs its own draw; the order
  of length-grouped batches per ``(seed, epoch)``.
* :func:`epoch_seed` — the training order per ``(seed, epoch)`` (the epoch samplers).
* :func:`epoch_rank_seed` — backward KD's auxiliary set per ``(run seed, epoch, rank)``.
* :func:`key_seed` — CRD's negatives per ``(seed, step, rank)``.

The last three are kept as they were first written rather than folded into :func:`mix`: the
published tables (MNIST-1D, CRD rows) were drawn with them, and a run must reproduce its table to
the last digit.
"""

from __future__ import annotations

import numpy as np

# One salt per use, so that equal (seed, a, b) give independent draws.
SALT_REPLAY_VIEW = 1
SALT_REPLAY_CROP = 2
SALT_LENGTH_GROUPS = 3

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


def epoch_seed(seed: int, epoch: int) -> int:
    """The training order's seed for ``epoch``; modulo 2**63 because an unseeded
    ``torch.initial_seed()`` is a full 64-bit number (the same value for real seeds)."""
    return (int(seed) * 1_000_003 + int(epoch)) % (1 << 63)


def epoch_rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A generator seed distinct for every ``(epoch, rank)`` of a run seeded ``seed``."""
    return (int(seed) + 1_000_003 * int(epoch) + 7_919 * int(rank)) % (2**63 - 1)


def key_seed(*key: int) -> int:
    """A 63-bit generator seed from a tuple of ints (Python hashes ints and tuples of ints the same
    way in every process: ``PYTHONHASHSEED`` salts only strings and bytes)."""
    return hash(tuple(int(k) for k in key)) & 0x7FFF_FFFF_FFFF_FFFF
