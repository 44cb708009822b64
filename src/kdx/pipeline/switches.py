"""The speed switches ``channels_last``, ``compile`` and ``cpu_allocator``: parsed once, for the config
check (:mod:`kdx.pipeline.validate`) and for the builder and the run (:mod:`kdx.pipeline.build`,
:mod:`kdx.pipeline.run`) alike."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kdx.allocator import CHOICES as ALLOCATORS
from kdx.allocator import retain_freed_memory
from kdx.errors import KDXError


def channels_last_switch(value: Any, accelerator: str, precision: str) -> bool:
    """``channels_last``: true / false, or ``auto``: on where it is the faster layout for conv models
    — on a CPU (oneDNN's native layout: every zoo student's step is 1.09–1.5× faster,
    docs/performance.md) and on a GPU at 16-bit precision (tensor cores); off on a GPU at 32 bits,
    where it was not measured. It only changes models with ``Conv2d`` layers (the builder checks)."""
    if value in (True, "true", "True"):
        return True
    if value in (None, False, "false", "False"):
        return False
    if value != "auto":
        raise KDXError(f"channels_last={value!r}: choose auto, true or false")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "16" in precision
    return accelerator in ("cpu", "auto")  # mps and others: off


def resolve_channels_last(cfg: DictConfig, *models: nn.Module | None) -> bool:
    """The memory format ``cfg`` gives ``models``: ``channels_last`` judged for the run's accelerator
    and precision (``trainer.*``, or the top-level keys of kdx-bench's config), and only where a
    model has a ``Conv2d`` layer (elsewhere it would change nothing but the teacher-cache key)."""
    trainer = cfg.get("trainer") or {}
    switch = channels_last_switch(
        cfg.get("channels_last", False),
        str(trainer.get("accelerator", cfg.get("accelerator", "auto"))),
        str(trainer.get("precision", cfg.get("precision", "32-true"))),
    )
    return switch and any(
        isinstance(m, nn.Conv2d) for model in models if model is not None for m in model.modules()
    )


def compile_switch(value: Any) -> bool | str:
    """``compile``: false, true (torch.compile's default backend) or a backend name (``aot_eager``...)."""
    if value in (None, False, "false", "False"):
        return False
    if value in (True, "true", "True"):
        return True
    if str(value) not in torch._dynamo.list_backends(exclude_tags=()):
        raise KDXError(
            f"compile={value!r} is neither true/false nor a torch.compile backend "
            f"({', '.join(torch._dynamo.list_backends())})"
        )
    return str(value)


def cpu_allocator_switch(value: Any) -> str:
    """``cpu_allocator``: ``retain`` (keep freed memory in the process: no page-fault storm each step,
    :mod:`kdx.allocator`) or ``system`` (the C library's own policy)."""
    if value not in ALLOCATORS:
        raise KDXError(f"cpu_allocator={value!r}: choose {' or '.join(ALLOCATORS)}")
    return str(value)


def apply_cpu_allocator(value: Any) -> bool:
    """Set the process's allocator policy from ``cpu_allocator`` (default ``retain``); True when
    freed memory is now retained. Process-wide: every run and bench side after it shares it."""
    return cpu_allocator_switch(value) == "retain" and retain_freed_memory()
