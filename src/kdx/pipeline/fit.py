"""Fit: the run's callbacks and loggers, then ``Trainer.fit`` on the built module."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kdx.callbacks import TrainingThroughput
from kdx.errors import KDXError
from kdx.pipeline.build import Components
from kdx.pipeline.compose import sweep_group
from kdx.pipeline.pretrain import init_epochs, init_lr, pretrain, resumes_pretraining
from kdx.pipeline.record import resolved

log = logging.getLogger("kdx")


@dataclass
class Fitted:
    trainer: L.Trainer
    fit_s: float
    # the method's pre-training phase (kdx.pipeline.pretrain), when it ran in this process
    pretrainer: L.Trainer | None = None
    # metrics.json figures of the fit itself (init/epochs, init/lr of a pre-training phase)
    figures: dict[str, Any] = field(default_factory=dict)


def run_name(cfg: DictConfig, method_name: str) -> str:
    """What tells a run apart in a sweep: ``kd-resnet8x4-resnet32x4-s1``."""
    parts = [cfg.get("label") or method_name, cfg.student.get("name")]
    if cfg.teacher.get("model") is not None:
        parts.append(cfg.teacher.get("name"))
    return "-".join(str(p) for p in parts) + f"-s{cfg.get('seed')}"


def _instantiate_dict(node: DictConfig | None, **extra: Any) -> list:
    return [
        instantiate(c, **extra.get(k, {}))
        for k, c in (node or {}).items()
        if c is not None and "_target_" in c
    ]


def make_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks, and the throughput meter every run reports."""
    callbacks = [*_instantiate_dict(cfg.get("callbacks"))]
    if not any(isinstance(c, TrainingThroughput) for c in callbacks):
        callbacks.append(TrainingThroughput())
    return callbacks


def make_loggers(cfg: DictConfig, name: str) -> list:
    """The configured loggers; W&B runs get a name and a group that tell the jobs of a sweep apart."""
    extra: dict[str, dict] = {}
    for key, node in (cfg.get("logger") or {}).items():
        if node is not None and str(node.get("_target_", "")).endswith("WandbLogger"):
            group = sweep_group() or f"{cfg.dataset.name}-{cfg.teacher.name}-{cfg.student.name}"
            extra[key] = {"name": node.get("name") or name, "group": node.get("group") or group}
    return _instantiate_dict(cfg.get("logger"), **extra)


def finish_loggers(loggers: list, status: str) -> None:
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception:  # noqa: BLE001 - closing a logger must not hide the run's own outcome
            log.warning("could not finalize logger %s", type(logger).__name__, exc_info=True)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if status == "success" else 1)  # the next job of a sweep gets its own run


def log_hparams(loggers: list, cfg: DictConfig, metrics: dict[str, float] | None = None) -> None:
    params = resolved(cfg)
    for logger in loggers:
        if metrics is not None and type(logger).__name__ == "TensorBoardLogger":
            logger.log_hyperparams(params, metrics={f"hparams/{k}": v for k, v in metrics.items()})
        elif metrics is None:
            logger.log_hyperparams(params)


def fit(cfg: DictConfig, parts: Components, callbacks: list, loggers: list) -> Fitted:
    """Train ``parts.module`` (resuming from ``cfg.ckpt_path`` when set); an error when no step ran.

    A method with a pre-training phase (``method.init_epochs``) runs it first, as its own fit
    (:mod:`kdx.pipeline.pretrain`); callbacks with ``in_pretraining = True`` watch that fit too."""
    started = time.perf_counter()
    pretrainer = pretrain(cfg, parts, callbacks=[c for c in callbacks if getattr(c, "in_pretraining", False)])
    # a pre-training checkpoint resumes the pre-training; the main phase then starts afresh
    main_ckpt = None if resumes_pretraining(cfg) else cfg.get("ckpt_path")
    trainer = parts.make_trainer(callbacks=callbacks, logger=loggers or False)
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=main_ckpt, weights_only=True)
    fit_s = time.perf_counter() - started
    if trainer.global_step == 0:
        raise KDXError(
            f"no training step ran (trainer.max_epochs={cfg.trainer.get('max_epochs')}, "
            f"limit_train_batches={cfg.trainer.get('limit_train_batches', 1.0)}); "
            "give the run at least one epoch with at least one batch"
        )
    epochs = init_epochs(parts.method)
    figures = {"init/epochs": epochs, "init/lr": init_lr(cfg, parts.method)} if epochs else {}
    return Fitted(trainer, fit_s, pretrainer, figures)
