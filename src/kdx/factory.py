"""The one place a :class:`~kdx.module.DistillationModule` and a ``lightning.Trainer`` are built.

``kdx-train`` (the student run and the auto-teacher run alike), ``kdx-eval`` and ``kdx-bench`` all
call these, so optimizer and scheduler wiring exists once.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from kdx.methods.base import DistillationMethod
from kdx.module import DistillationModule


def build_module(
    cfg: DictConfig,
    student: nn.Module,
    method: DistillationMethod,
    teacher: nn.Module | None = None,
    optim: DictConfig | None = None,
) -> DistillationModule:
    """The LightningModule of ``cfg``: ``cfg.optim`` (or ``optim``) wires optimizer and scheduler."""
    optim = cfg.get("optim") if optim is None else optim
    has_optim = optim is not None and optim.get("optimizer") is not None
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
    )


def _no_optimizer(params: Any) -> None:
    """Evaluation-only modules (kdx-eval) have nothing to optimise."""
    return None


def build_trainer(trainer_cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """``instantiate(trainer_cfg)`` with keyword overrides (callbacks, logger, devices...)."""
    return instantiate(trainer_cfg, **overrides)
