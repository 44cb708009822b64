"""What a run prints on the console, set up once per job by the entry points.

Hydra sends every log record to the console and to the run's log file (``<task>.log``). The console
gets less than the file:

- Lightning's routine notices ("GPU available: False", "TPU available", "`Trainer(...)` was
  configured", "Be aware that when using `ckpt_path`", "`Trainer.fit` stopped", restoring the best
  checkpoint for the test, its litlogger advertisement) stay in the file;
- under DDP only rank 0 speaks on the console (errors excepted);
- in a multirun every console line names its job (``[job 3 method=kd seed=1]``): with a parallel
  launcher (joblib) the jobs' lines interleave;
- console lines are written to the *current* ``sys.stdout``/``sys.stderr``, so that while Lightning's
  rich progress bar is live (it redirects both to print above itself) a log line never lands on
  the bar's line.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

# Lightning's notices that say nothing about this run (they stay in the run's log file)
ROUTINE_NOTICES = re.compile(
    r"^(GPU available:|TPU available:|HPU available:|IPU available:|`Trainer\(.*\)` was configured"
    r"|Be aware that when using `ckpt_path`|💡 Tip:|.*litlogger|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"
    r"|`Trainer.fit` stopped:|Loading `train_dataloader` to estimate number of stepping batches|Restoring states from the checkpoint path|Loaded model weights from the checkpoint"
    r"|Initializing distributed:|distributed_backend=|-{20,}|All distributed processes registered)",
    re.S,
)
# the keys a multirun sweeps, for its jobs' names (set by the front door, read in every job)
SWEEP_KEYS_ENV = "KDX_SWEEP_KEYS"
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


class _CurrentStream:
    """A stream that writes to whatever ``sys.<name>`` is now (a progress bar may have redirected it)."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


class ConsoleFilter(logging.Filter):
    """Drops routine notices and, on a rank other than 0, everything below a warning; prefixes the
    job's name in a multirun."""

    def __init__(self, rank: int = 0, job: str | None = None):
        super().__init__()
        self.rank, self.job = rank, job

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0 and record.levelno < logging.WARNING:
            return False
        if ROUTINE_NOTICES.match(record.getMessage().strip()):
            return False
        if self.job and not getattr(record, "kdx_job", None):
            record.kdx_job = self.job
            record.msg, record.args = f"[{self.job}] {record.getMessage()}", None
        return True


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _console_handlers(stdio: tuple) -> list[logging.StreamHandler]:
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and (getattr(h, "stream", None) in stdio or isinstance(h.stream, _CurrentStream))
    ]


_STDIO_NAMES = ("stdout", "stderr", "__stdout__", "__stderr__")


def _stdio() -> tuple:
    wrapped = [getattr(sys, n) for n in _STDIO_NAMES]
    return (*wrapped, *(s._stream for s in wrapped if isinstance(s, _PipeSafe)))


def configure_console(job: str | None = None) -> None:
    """Set up the console of this job (idempotent): Lightning's records go through the root
    logger's handlers (so the log file keeps them), and the console handlers get :class:`ConsoleFilter`
    and a stream that follows ``sys.stdout``/``sys.stderr``."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handler
                logger.removeHandler(handler)
        logger.propagate = True
    stdio = _stdio()
    for handler in _console_handlers(stdio):
        for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
            handler.removeFilter(old)
        handler.addFilter(ConsoleFilter(_rank(), job))
        if not isinstance(handler.stream, _CurrentStream):
            err = handler.stream in (sys.stderr, sys.__stderr__, getattr(sys.stderr, "_stream", None))
            handler.setStream(_CurrentStream("stderr" if err else "stdout"))  # type: ignore[arg-type]


def hydra_job_name() -> str | None:
    """``job <n> <overrides>`` of this multirun job (``None`` outside a multirun)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    # the swept keys: the command line's (set by kdx.front_door.launch) and a search's (Optuna)
    swept = {k for k in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if k}
    swept |= set((hydra_cfg.sweeper.get("params") or {}).keys())
    task = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
    named = [o for o in task if o.split("=", 1)[0].lstrip("+~") in swept] or task
    overrides = " ".join(named)
    if len(overrides) > 60:
        overrides = overrides[:59] + "…"
    return f"job {hydra_cfg.job.num}" + (f" {overrides}" if overrides else "")


def quiet_broken_pipe() -> None:
    """For a command that only prints (``--help``): stop quietly when the reader is gone."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


class _PipeSafe:
    """``sys.stdout``/``sys.stderr`` for a run: once the reader of a pipe is gone (``kdx-train ... |
    head``) the rest of the output goes to the null device — no BrokenPipeError traceback, and the
    run itself goes on to write its results."""

    def __init__(self, stream):
        self._stream = stream

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def pipe_safe_stdio() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`_PipeSafe` (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeSafe):
            try:
                stream.fileno()
            except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
                continue
            setattr(sys, name, _PipeSafe(stream))
