"""The pipeline, top to bottom: :func:`run` chains compose's output through validate → build → fit
→ evaluate → record; :func:`run_job` is the wrapper every run goes through.

A user error (:class:`~kdx.errors.KDXError`: bad path, class-count mismatch, bad hyper-parameter,
NaN loss) is printed as one line and the process exits 2; anything else is a bug: its full
traceback goes to stderr and to the run's log and the process exits 1. Either way the run folder
gets a ``metrics.json`` with ``status: failed`` (or the error's own: ``diverged``), the error's type
and message and the log's path, the loggers are closed, and in a multirun the sweep goes on (the
multirun then exits non-zero once every job has run). A run that finished but learned nothing
(``status: no_learning``, :class:`~kdx.errors.NoLearningError`) keeps its figures and checkpoints,
and ends the same way as a user error: one line, exit 2, the sweep goes on.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from kdx import runlock
from kdx.errors import KDXError
from kdx.hydra_callbacks import report_interrupted_sweep
from kdx.pipeline import interrupt, record
from kdx.pipeline.build import build, root_cause
from kdx.pipeline.compose import hydra_output_dir, is_multirun, task_overrides
from kdx.pipeline.evaluate import evaluate
from kdx.pipeline.fit import (
    finish_loggers,
    fit,
    keep_history,
    log_hparams,
    make_callbacks,
    make_loggers,
    resumed_from,
    run_name,
)
from kdx.pipeline.interrupt import SaveOnInterrupt
from kdx.pipeline.switches import apply_cpu_allocator
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
    apply_cpu_allocator(cfg.get("cpu_allocator", "retain"))
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    resumed = resumed_from(cfg)  # read safely before any teacher or data work
    parts = build(cfg, train_teacher=run)  # an auto-teacher is trained by this same pipeline
    method_name = parts.method.name
    callbacks = [*make_callbacks(cfg), SaveOnInterrupt(cfg.paths.output_dir)]
    history = keep_history(cfg, resumed)  # a resumed run's logs keep the epochs before the restart
    loggers = make_loggers(cfg, run_name(cfg, method_name), resumed=resumed)
    status = "failed"
    try:
        log_hparams(loggers, cfg)
        fitted = fit(cfg, parts, callbacks, loggers)
        evaluated = {**evaluate(cfg, fitted.trainer, parts.module, parts.datamodule), **fitted.figures}
        status = "success"
    finally:
        finish_loggers(loggers, status)
        history.restore()
    result = record.run_record(
        cfg,
        evaluated,
        method_name=method_name,
        callbacks=callbacks,
        trainer=fitted.trainer,
        fit_s=fitted.fit_s,
        teacher_info=parts.teacher_info,
        warnings=parts.warnings,
    ).merged(read_records(parts))
    if fitted.trainer.is_global_zero:
        record.write(cfg, result)
    metrics = result.to_dict()
    log_hparams(loggers, cfg, {k: v for k, v in metrics.items() if k.startswith("student/acc")})
    return metrics


def read_records(parts: Any) -> dict[str, Any]:
    """What the data module and the teacher-output cache say they read."""
    values: dict[str, Any] = {}
    examples = getattr(parts.datamodule, "examples_read", None)
    if examples:
        values["data/examples"] = dict(examples)
    batching = getattr(parts.datamodule, "batching", None)
    if batching:
        values["data/batching"] = batching
    cache = getattr(parts.module, "teacher_cache", None)
    if cache is not None and getattr(cache, "status", None):
        values["teacher_cache/status"] = cache.status
        values["teacher_cache/problem"] = cache.problem
        if cache.info.get("bytes_per_token") is not None:  # teacher.cache=topk
            values["teacher_cache/bytes_per_token"] = cache.info["bytes_per_token"]
            values["teacher_cache/topk_kl"] = cache.info.get("topk_kl_mean")
    return values


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


def _to_log_file(level: int, message: str, exc_info: BaseException | None = None) -> None:
    """``message`` into the run's log file only: the console gets its own plain line, once."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    if exc_info is not None:
        record.exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    for handler in {*logging.getLogger().handlers, *log.handlers}:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def _say(message: str, err: BaseException | None = None) -> None:
    _to_log_file(logging.ERROR, message, err)
    print(message, file=sys.stderr, flush=True)
    if err is not None:
        traceback.print_exception(err, file=sys.stderr)


def _own_folder(cfg: DictConfig) -> None:
    """Hold the run folder (one process per folder); a busy folder is one line and exit 2, with
    nothing written into it."""
    try:
        runlock.acquire(cfg.paths.output_dir)
    except runlock.FolderInUse as err:
        print(f"kdx: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    made = hydra_output_dir()
    if made is not None and Path(made).resolve() != Path(cfg.paths.output_dir).resolve():
        # a resume continues in the run's own folder: the one Hydra made for this command is let go
        runlock.release(made)
        (Path(made) / runlock.LOCK_NAME).unlink(missing_ok=True)


def run_job(cfg: DictConfig) -> float:
    """Run, and turn any failure into a failed ``metrics.json``, a log entry and an exit code; a
    signal into an interrupted one and exit code 128 + the signal."""
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        _own_folder(cfg)
    try:
        with interrupt.handle_signals():
            metrics = run(cfg)
    except BaseException as err:  # noqa: BLE001 - a signal's SystemExit/KeyboardInterrupt is recorded too
        if not isinstance(err, Exception) and not interrupt.is_interruption(err):
            raise
        if interrupt.is_interruption(err):
            _interrupted(cfg, err)
        cause = root_cause(err)
        user_error = isinstance(cause, KDXError)
        if rank_zero_only.rank == 0:
            record.write(cfg, record.failure_record(cfg, err))
        if user_error:
            _say(f"kdx: error: {cause}")
        else:  # a bug: the traceback goes to the run's log file and to stderr
            _say(f"kdx: run failed with an unexpected {type(cause).__name__}: {cause}", err)
        if is_multirun():
            return worst_score(cfg)
        sys.exit(2 if user_error else 1)
    result = RunRecord.from_dict(metrics)
    if cfg.get("print_summary", True) and rank_zero_only.rank == 0:
        print_summary(result, output_dir)
    if not result.ok:  # it finished but did not do what was asked (no_learning): figures kept, exit 2
        _say(f"kdx: error: {result.error}")
        if is_multirun():
            return worst_score(cfg)
        sys.exit(2)
    value = metrics.get("monitor/best")
    return float(value) if value is not None and math.isfinite(value) else worst_score(cfg)


def _interrupted(cfg: DictConfig, err: BaseException) -> NoReturn:
    """Record the interruption, say how to resume, and exit 128 + the signal; a multirun launches
    no further job and reports the sweep first."""
    signum = interrupt.signal_of(err)
    values = interrupt.record_values(err, Path(cfg.paths.output_dir), task_overrides())
    if rank_zero_only.rank == 0:
        record.write(cfg, record.failure_record(cfg, err).merged(values))
    _say(f"kdx: {values['error']}")
    if is_multirun():
        report_interrupted_sweep(signum)
    sys.exit(128 + signum)
