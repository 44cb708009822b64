"""Evaluate: the test figures of the last epoch and of the epoch the monitor picked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig


def as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def test_metrics(results: list[dict]) -> dict[str, float]:
    """``trainer.test``'s results as one mapping, without the ``test/`` prefix."""
    merged: dict[str, float] = {}
    for r in results:
        merged.update({k.removeprefix("test/"): as_float(v) for k, v in r.items()})
    return merged


# figures measured on both checkpoints, so that a table pairs best-epoch accuracy with the fidelity
# of the same weights
BEST_TOO = (
    "student/acc",
    "fidelity/agreement",
    "fidelity/kl",
    "fidelity/kernel_gap",
    "fidelity/cka",
    "student/ece",
    "student/mcc",  # a task's own scores (GLUE), when the data module declares them
    "student/f1",
    "student/ppl",  # a causal language model's held-out perplexity
)


def _best_checkpoint(trainer: L.Trainer, monitor: str):
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == monitor), None)


def evaluate(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule) -> dict[str, Any]:
    """The monitor's best score, and (``test: true``) the test figures of the last and best checkpoints."""
    monitor = str(cfg.get("monitor", "val/student/acc"))
    best_ckpt = _best_checkpoint(trainer, monitor)
    best_score = (
        None
        if best_ckpt is None or best_ckpt.best_model_score is None
        else as_float(best_ckpt.best_model_score)
    )
    metrics: dict[str, Any] = {
        "monitor": monitor,
        "monitor_mode": cfg.get("monitor_mode", "max"),
        "monitor/best": best_score,
        "student/val_acc_best": best_score if monitor == "val/student/acc" else None,
    }
    if cfg.get("test", True):
        metrics.update(test_metrics(trainer.test(module, datamodule=datamodule, verbose=False)))
        best_path = best_ckpt.best_model_path if best_ckpt else ""
        if best_path and Path(best_path).is_file():
            best = test_metrics(
                trainer.test(
                    module, datamodule=datamodule, ckpt_path=best_path, verbose=False, weights_only=True
                )
            )
            metrics["student/best_ckpt"] = best_path
        else:
            best = metrics
        metrics.update({f"{key}_best": best[key] for key in BEST_TOO if key in best})
    return metrics
