"""Record: the run's ``metrics.json`` (:class:`kdx.record.RunRecord`), for a finished run and for a
failed one alike.

``metrics.json`` is the one contract with ``kdx-table``: besides the figures it carries the run's
group choices, its resolved config, the experiment's published numbers, tags and label.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import hydra
import lightning
import timm
import torch
import torchmetrics
from omegaconf import DictConfig, OmegaConf

import kdx
from kdx.callbacks import ReportsMetrics
from kdx.methods.base import METHODS
from kdx.pipeline.build import root_cause
from kdx.pipeline.compose import hydra_choices, log_file
from kdx.record import RunRecord, write_record


def _versions() -> dict[str, str]:
    return {
        "kdx": kdx.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "timm": timm.__version__,
        "hydra": hydra.__version__,
    }


def _choices(cfg: DictConfig, method_name: str | None = None) -> dict[str, str]:
    from_hydra = hydra_choices()
    if from_hydra is not None and cfg.get("task_name") != "teacher":
        return from_hydra
    return {
        "dataset": str(cfg.dataset.get("name")),
        "teacher": str(cfg.teacher.get("name")),
        "student": str(cfg.student.get("name")),
        "method": method_name or _target_name(cfg.method),
    }


def _target_name(node: Any) -> str:
    target = str(node.get("_target_", "?")) if node is not None else "?"
    return next(
        (name for name, cls in METHODS.items() if f"{cls.__module__}.{cls.__qualname__}" == target), target
    )


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config with interpolations resolved, key by key: one that cannot be resolved here (a
    ``${hydra:...}`` outside a Hydra app, a bad value being reported) stays as written."""
    out: dict[str, Any] = {}
    for key in cfg:
        try:
            value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=True)
            out[str(key)] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except Exception:  # noqa: BLE001 - an unresolvable value is itself worth recording as written
            node = cfg._get_node(str(key))
            out[str(key)] = (
                OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else str(node)
            )
    return out


def provenance(cfg: DictConfig, method_name: str | None = None) -> dict[str, Any]:
    """The keys every metrics.json has, whatever the run's outcome."""
    choices = _choices(cfg, method_name)
    published = cfg.get("published")
    return {
        "seed": cfg.get("seed"),
        "method": method_name or choices.get("method"),
        "label": cfg.get("label"),
        "dataset": cfg.dataset.get("name"),
        "teacher": cfg.teacher.get("name"),
        "student": cfg.student.get("name"),
        "choices": choices,
        "tags": list(cfg.get("tags") or []),
        "published": OmegaConf.to_container(published, resolve=True) if published is not None else None,
        "config": resolved(cfg),
        "versions": _versions(),
        "resumed_from": str(cfg.ckpt_path) if cfg.get("ckpt_path") else None,
    }


def run_record(
    cfg: DictConfig,
    evaluated: dict[str, Any],
    *,
    method_name: str,
    callbacks: list,
    trainer: lightning.Trainer,
    fit_s: float,
    teacher_info: dict[str, Any],
    warnings: list[str],
) -> RunRecord:
    """The record of a finished run: the evaluation's figures, the callbacks' reports, the teacher's
    figures, provenance, and every warning once. A callback's verdict (DivergenceMonitor: the student
    is at chance) sets the status and the error; the figures stay."""
    metrics = dict(evaluated)
    verdicts = []
    for callback in callbacks:  # callbacks with headline figures of their own (diagnostics, throughput)
        if isinstance(callback, ReportsMetrics):
            metrics.update(callback.report())
            verdicts.append(callback.verdict())
    verdict = next((v for v in verdicts if v is not None), None)
    if verdict is not None:
        metrics.update({"error": str(verdict), "error_type": type(verdict).__name__, "log": log_file(cfg)})
    metrics.update(
        {
            "status": "ok" if verdict is None else verdict.status,
            "time/fit_s": fit_s,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "teacher/sha256": teacher_info.get("teacher/sha256"),
            **provenance(cfg, method_name),
        }
    )
    metrics.update({k: v for k, v in teacher_info.items() if k not in metrics})
    # the build's warnings and those of callbacks (DivergenceMonitor), each once
    metrics["warnings"] = list(dict.fromkeys([*warnings, *(metrics.get("warnings") or [])]))
    return RunRecord.from_dict(metrics)


def failure_record(cfg: DictConfig, err: BaseException) -> RunRecord:
    """The record of a run that raised ``err``: provenance, status, the error and the log's path."""
    cause = root_cause(err)
    message = str(cause).strip() or type(cause).__name__
    try:
        record = provenance(cfg)
    except Exception:  # noqa: BLE001 - the record of a failure must not fail itself
        record = {"seed": str(cfg.get("seed"))}
    return RunRecord.from_dict(
        {
            **record,
            "status": getattr(cause, "status", "failed"),  # DivergenceError: "diverged"
            "error": message,
            "error_type": type(cause).__name__,
            "log": log_file(cfg),
        }
    )


def write(cfg: DictConfig, record: RunRecord) -> Path:
    """``<output_dir>/metrics.json``, written atomically."""
    path = Path(cfg.paths.output_dir) / "metrics.json"
    write_record(path, record)
    return path
