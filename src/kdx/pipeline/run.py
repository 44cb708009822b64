"""The pipeline, top to bottom: :func:`run` chains compose's output through validate → build → fit
→ evaluate → record; :func:`run_job` is the wrapper every run goes through.

A user error (:class:`~kdx.errors.KDXError`: bad path, class-count mismatch, bad hyper-parameter,
NaN loss) is printed as one line and the process exits 2; anything else is a bug: its full
traceback goes to stderr and to the run's log and the process exits 1. Either way the run folder
gets a ``metrics.json`` with ``status: failed``, the error's type and message and the log's path,
the loggers are closed, and in a multirun the sweep goes on (the multirun then exits non-zero once
every job has run).
"""

from __future__ import annotations

import logging
import math
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from kdx.errors import KDXError
from kdx.pipeline import record
from kdx.pipeline.build import build, root_cause
from kdx.pipeline.compose import is_multirun
from kdx.pipeline.evaluate import evaluate
from kdx.pipeline.fit import finish_loggers, fit, log_hparams, make_callbacks, make_loggers, run_name
from kdx.pipeline.validate import validate_config
from kdx.record import RunRecord

log = logging.getLogger("kdx")

# Noise that says nothing about a kdx run: the frozen teacher is in eval mode on purpose, and
# Lightning's advertisement and a deprecation inside Lightning itself.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda r: "litlogger" not in r.getMessage()
)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One training run; returns the figures written to ``<output_dir>/metrics.json``."""
    validate_config(cfg)  # before any data or teacher work
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    parts = build(cfg, train_teacher=run)  # an auto-teacher is trained by this same pipeline
    method_name = parts.method.name
    callbacks = make_callbacks(cfg)
    loggers = make_loggers(cfg, run_name(cfg, method_name))
    status = "failed"
    try:
        log_hparams(loggers, cfg)
        fitted = fit(cfg, parts, callbacks, loggers)
        evaluated = {**evaluate(cfg, fitted.trainer, parts.module, parts.datamodule), **fitted.figures}
        status = "success"
    finally:
        finish_loggers(loggers, status)
    result = record.run_record(
        cfg,
        evaluated,
        method_name=method_name,
        callbacks=callbacks,
        trainer=fitted.trainer,
        fit_s=fitted.fit_s,
        teacher_info=parts.teacher_info,
        warnings=parts.warnings,
    )
    if fitted.trainer.is_global_zero:
        record.write(cfg, result)
    metrics = result.to_dict()
    log_hparams(loggers, cfg, {k: v for k, v in metrics.items() if k.startswith("student/acc")})
    return metrics


def print_summary(result: RunRecord, output_dir: Path) -> None:
    # rich is imported only when a summary is printed: the run itself never needs it
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kdx · {result.title()}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.summary_rows():
        table.add_row(key, value)
    Console().print(table)
    for warning in result.warnings or []:
        Console().print(f"[yellow]warning:[/yellow] {warning}")
    Console().print(f"metrics: {output_dir / 'metrics.json'}")


def worst_score(cfg: DictConfig) -> float:
    # -inf (not NaN, which optuna refuses) makes an Optuna sweep record a failed job as the worst trial
    return float("inf") if str(cfg.get("monitor_mode", "max")) == "min" else float("-inf")


def run_job(cfg: DictConfig) -> float:
    """Run, and turn any failure into a failed ``metrics.json``, a log entry and an exit code."""
    output_dir = Path(cfg.paths.output_dir)
    try:
        metrics = run(cfg)
    except Exception as err:
        cause = root_cause(err)
        user_error = isinstance(cause, KDXError)
        if rank_zero_only.rank == 0:
            record.write(cfg, record.failure_record(cfg, err))
        if user_error:
            log.error("kdx: error: %s", cause)
        else:  # a bug: the traceback goes to the run's log file and to stderr
            log.error("run failed with an unexpected %s", type(cause).__name__, exc_info=err)
        if is_multirun():
            return worst_score(cfg)
        if user_error:
            print(f"kdx: error: {cause}", file=sys.stderr)
            sys.exit(2)
        traceback.print_exception(err, file=sys.stderr)
        sys.exit(1)
    if cfg.get("print_summary", True) and rank_zero_only.rank == 0:
        print_summary(RunRecord.from_dict(metrics), output_dir)
    value = metrics.get("monitor/best")
    return float(value) if value is not None and math.isfinite(value) else worst_score(cfg)
