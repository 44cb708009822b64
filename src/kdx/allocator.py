"""The C allocator's policy for freed memory on a CPU run (``cpu_allocator``; no kdx dependencies).

glibc's ``malloc`` hands every block above its mmap threshold (128 KiB at first, rising with what is
freed) straight back to the kernel when it is freed, and trims the heap's free top above 128 KiB. A
training step allocates and frees the same tensors every step, and on a CPU those are often larger
than the threshold (a causal LM's ``(B, L, V)`` logits: 2 MiB at 32 × 32 × 512), so every step maps
them afresh and page-faults every 4 KiB page in again; how many depends on what else the process
has freed, and it changes from segment to segment. Measured on this project's CPU with the
language-model pair of kdx-bench: 650–2,200 minor page faults a step, and step times that moved by
up to a fifth between identical segments; with freed memory kept (``retain``), 1–15 faults a step,
the LM step 3–10 % and kdx's resnet56 → resnet20 step 19 % shorter (docs/performance.md).
jemalloc and tcmalloc keep freed memory the same way; they need ``LD_PRELOAD`` before Python
starts, ``mallopt`` does not.

``retain`` keeps blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) in the heap and
returns its free top to the kernel only above 1 GiB, so a process holds on to its peak working
set. ``system`` leaves the allocator as the C library set it. Anything but glibc is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

CHOICES = ("retain", "system")
# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
TRIM_THRESHOLD = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl and others have no mallopt, or one that does nothing; glibc names its version
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
    """Keep freed blocks up to 32 MiB in the process instead of unmapping them (``retain``); True when
    glibc took both settings."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
