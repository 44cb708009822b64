"""The one place a :class:`~kdx.module.DistillationModule` and a ``lightning.Trainer`` are built.

``kdx-train`` (the student run and the auto-teacher run alike), ``kdx-eval`` and ``kdx-bench`` all
call these, so optimizer and scheduler wiring exists once.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdx.errors import KDXError
from kdx.methods.base import DistillationMethod
from kdx.module import DistillationModule
from kdx.teacher import _DATA_KEY_EXCLUDED
from kdx.teacher_outputs import TeacherOutputCache


def build_module(
    cfg: DictConfig,
    student: nn.Module,
    method: DistillationMethod,
    teacher: nn.Module | None = None,
    optim: DictConfig | None = None,
) -> DistillationModule:
    """The LightningModule of ``cfg``: ``cfg.optim`` (or ``optim``) wires optimizer and scheduler;
    ``teacher.cache`` the teacher-output cache, ``channels_last`` / ``compile`` (top-level switches)
    the student's (and a frozen teacher's) memory format and ``torch.compile``."""
    optim = cfg.get("optim") if optim is None else optim
    has_optim = optim is not None and optim.get("optimizer") is not None
    channels_last = resolve_channels_last(cfg, student, teacher)
    return DistillationModule(
        student=student,
        method=method,
        num_classes=int(cfg.dataset.num_classes),
        optimizer=instantiate(optim.optimizer) if has_optim else _no_optimizer,
        scheduler=instantiate(optim.scheduler) if has_optim and optim.get("scheduler") else None,
        scheduler_interval=optim.get("interval", "epoch") if has_optim else "epoch",
        teacher=teacher,
        student_stages=cfg.student.get("stage_names"),
        teacher_stages=cfg.teacher.get("stage_names") if cfg.get("teacher") else None,
        nonfinite_check_every=int(cfg.trainer.get("log_every_n_steps") or 10) if cfg.get("trainer") else 10,
        teacher_cache=build_teacher_cache(cfg, channels_last) if teacher is not None else None,
        channels_last=channels_last,
        compile=compile_switch(cfg.get("compile", False)),
    )


def channels_last_switch(value: Any, accelerator: str, precision: str) -> bool:
    """``channels_last``: true / false, or ``auto``: on where it is the faster layout for conv models
    — on a CPU (oneDNN's native layout: every zoo student's step is 1.09–1.5× faster,
    docs/performance.md) and on a GPU at 16-bit precision (tensor cores); off on a GPU at 32 bits,
    where it was not measured. It only changes models with ``Conv2d`` layers (the factory checks)."""
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
    import torch

    if str(value) not in torch._dynamo.list_backends(exclude_tags=()):
        raise KDXError(
            f"compile={value!r} is neither true/false nor a torch.compile backend "
            f"({', '.join(torch._dynamo.list_backends())})"
        )
    return str(value)


def cache_mode(cfg: DictConfig) -> str:
    """``teacher.cache`` as a string (YAML reads a bare ``off`` as false)."""
    mode = cfg.teacher.get("cache", "off") if cfg.get("teacher") else "off"
    return "off" if mode in (None, False) else str(mode)


def build_teacher_cache(cfg: DictConfig, channels_last: bool = False) -> TeacherOutputCache | None:
    """The run's teacher-output cache (``teacher.cache``), keyed by everything that decides the
    stored outputs apart from the weights and the training transform (added when it is filled);
    ``channels_last``: the models' memory format as the factory resolved it."""
    mode = cache_mode(cfg)
    if mode == "off":
        return None
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    datamodule = {
        k: v for k, v in (dataset.pop("datamodule", None) or {}).items() if k not in _DATA_KEY_EXCLUDED
    }
    trainer = cfg.get("trainer") or {}
    key = {
        "teacher": str(cfg.teacher.get("name")),
        "teacher_model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
        "dataset": {**dataset, "datamodule": datamodule},
        "precision": str(trainer.get("precision", "32-true")),
        "channels_last": channels_last,
    }
    return TeacherOutputCache(
        mode,
        cfg.paths.cache_dir,
        key,
        seed=int(cfg.get("seed", 0)),
        views=int(cfg.teacher.get("cache_views", 4)),
        topk=cfg.teacher.get("cache_topk"),
        batch_size=int(cfg.dataset.get("datamodule", {}).get("eval_batch_size") or 256),
    )


def _no_optimizer(params: Any) -> None:
    """Evaluation-only modules (kdx-eval) have nothing to optimise."""
    return None


def build_trainer(trainer_cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """``instantiate(trainer_cfg)`` with keyword overrides (callbacks, logger, devices...)."""
    return instantiate(trainer_cfg, **overrides)
