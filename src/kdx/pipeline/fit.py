"""Fit: the run's callbacks and loggers, then ``Trainer.fit`` on the built module."""

from __future__ import annotations

import csv
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kdx.callbacks import TrainingThroughput
from kdx.errors import KDXError
from kdx.models.weights import read_checkpoint
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


@dataclass
class Resumed:
    """The checkpoint a run continues from: its file, and where its training stood."""

    ckpt: str
    epoch: int
    global_step: int


def resumed_from(cfg: DictConfig) -> Resumed | None:
    """The checkpoint ``cfg.ckpt_path`` names, read safely (a pickle with a payload is refused here,
    in kdx's words, before Lightning reads it)."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    state = read_checkpoint(Path(str(ckpt)), "resume (ckpt_path)")
    if not isinstance(state, dict) or "epoch" not in state:
        raise KDXError(
            f"ckpt_path={ckpt} is not a Lightning checkpoint (no training state to resume); pass a run's "
            "checkpoints/last.ckpt, or give plain weights as teacher.ckpt=<file>"
        )
    return Resumed(str(ckpt), int(state["epoch"]), int(state.get("global_step", 0)))


@dataclass
class History:
    """A resumed run's CSV rows from before the restart, written back in front of the new ones."""

    path: Path | None = None
    rows: list[dict[str, str]] = field(default_factory=list)

    def restore(self) -> None:
        if self.path is None or not self.rows:
            return
        new: list[dict[str, str]] = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                new = list(csv.DictReader(f))
        rows = [*self.rows, *new]
        keys = sorted({k for row in rows for k in row})
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)


def _csv_dir(cfg: DictConfig) -> Path | None:
    for node in (cfg.get("logger") or {}).values():
        if node is not None and str(node.get("_target_", "")).endswith("CSVLogger"):
            version = node.get("version")
            return (
                Path(str(node.save_dir))
                / str(node.get("name") or "")
                / ("" if version in (None, "") else str(version))
            )
    return None


def keep_history(cfg: DictConfig, resumed: Resumed | None) -> History:
    """The CSV rows of the epochs the checkpoint holds (those up to its epoch); later rows (the
    interrupted epoch, replayed now) are dropped. The old file is moved away so Lightning's CSV
    logger starts a clean one."""
    folder = _csv_dir(cfg) if resumed is not None else None
    path = folder / "metrics.csv" if folder is not None else None
    if path is None or not path.is_file():
        return History()
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))

    def _before(row: dict[str, str]) -> bool:
        try:
            if row.get("epoch"):
                return int(float(row["epoch"])) <= resumed.epoch
            return int(float(row.get("step") or 0)) < resumed.global_step  # e.g. the learning rate
        except ValueError:  # a row that names neither: kept
            return True

    path.unlink()
    return History(path, [r for r in rows if _before(r)])


def make_loggers(cfg: DictConfig, name: str, resumed: Resumed | None = None) -> list:
    """The configured loggers; W&B runs get a name and a group that tell the jobs of a sweep apart.
    A resumed run's TensorBoard log drops what was logged after its checkpoint (``purge_step``)."""
    extra: dict[str, dict] = {}
    for key, node in (cfg.get("logger") or {}).items():
        if (
            node is not None
            and resumed is not None
            and str(node.get("_target_", "")).endswith("TensorBoardLogger")
        ):
            extra[key] = {"purge_step": resumed.global_step}
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
