"""Interruptions: a run stopped by a signal ends with ``status: interrupted``, a checkpoint to resume
from, and exit code 128 + the signal.

SIGTERM (SLURM, Kubernetes, ``timeout``, docker), SIGINT (Ctrl-C) and SIGUSR1/2 (what SLURM sends
before the time limit) are handled the same way. During ``Trainer.fit`` Lightning's own SIGTERM
handling stops the loop at the next batch boundary (its handler calls ours, which only notes the
signal); SIGUSR1/2 are passed on to that handler as a SIGTERM, unless Lightning's SLURM requeue
owns the requeue signal. Outside a fit (data preparation, the test) the signal stops the run at once.
:class:`SaveOnInterrupt` makes sure a ``last.ckpt`` exists at the interruption.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(BaseException):
    """A signal arrived outside a Lightning loop (which has its own way to stop)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@dataclass
class State:
    signum: int | None = None
    epoch: int | None = None
    step: int | None = None
    ckpt: str | None = None
    mid_epoch: bool = False


state = State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if state.signum is None:
        state.signum = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt  # Lightning stops a fit on it; anywhere else it unwinds the run
    current = signal.getsignal(signal.SIGTERM)
    if current is _handler:  # no Lightning loop running: stop now
        raise Interrupted(signum)
    if signum != signal.SIGTERM and callable(current):  # a fit: stop it the way Lightning stops on SIGTERM
        current(signal.SIGTERM, frame)
    # a SIGTERM during a fit: Lightning's handler (which called this one) stops the loop


def _slurm_requeue_signal() -> int | None:
    """The signal Lightning's SLURM auto-requeue handles itself, when it is active."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return signal.SIGUSR1 if SLURMEnvironment.detect() else None


@contextlib.contextmanager
def handle_signals() -> Iterator[State]:
    """Install kdx's handlers for the run's duration (main thread only); yield what was received."""
    state.__init__()  # type: ignore[misc]
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    leave = _slurm_requeue_signal()
    previous = {s: signal.getsignal(s) for s in SIGNALS if s != leave}
    for s in previous:
        signal.signal(s, _handler)
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def is_interruption(err: BaseException) -> bool:
    return isinstance(err, (Interrupted, SIGTERMException, KeyboardInterrupt)) or (
        isinstance(err, SystemExit) and state.signum is not None
    )


def signal_of(err: BaseException) -> int:
    if state.signum is not None:
        return state.signum
    if isinstance(err, Interrupted):
        return err.signum
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM


def last_checkpoint_path(trainer: L.Trainer, output_dir: str | Path) -> Path:
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.filename == "last" and cb.dirpath:
            return Path(cb.dirpath) / "last.ckpt"
    return Path(output_dir) / "checkpoints" / "last.ckpt"


class SaveOnInterrupt(L.Callback):
    """At an interruption: note the epoch and step, and save ``last.ckpt`` when no epoch ended yet.

    An existing ``last.ckpt`` (written at every epoch's end) is kept: resuming from an epoch boundary
    replays the interrupted epoch exactly, where a mid-epoch checkpoint cannot."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = output_dir

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not is_interruption(exception):
            return
        state.epoch, state.step = trainer.current_epoch, trainer.global_step
        path = last_checkpoint_path(trainer, self.output_dir)
        if not path.is_file() and trainer.global_step > 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(path)
            state.mid_epoch = True
        if path.is_file():
            state.ckpt = str(path.resolve())


def describe(signum: int) -> str:
    return signal.Signals(signum).name


def resume_command(output_dir: Path, ckpt: str | None, overrides: list[str] | None) -> str | None:
    """The command that continues this run: kdx's resume reads the run's own overrides from its
    ``.hydra/overrides.yaml``; without that file the overrides are spelled out."""
    if ckpt is None:
        return None
    if (output_dir / ".hydra" / "overrides.yaml").is_file():
        return f"kdx-train ckpt_path={ckpt}"
    given = " ".join(o for o in overrides or [] if not o.startswith("ckpt_path="))
    return f"kdx-train {given + ' ' if given else ''}ckpt_path={ckpt} hydra.run.dir={output_dir}"


def record_values(err: BaseException, output_dir: Path, overrides: list[str] | None) -> dict[str, Any]:
    signum = signal_of(err)
    name = describe(signum)
    command = resume_command(output_dir, state.ckpt, overrides)
    where = f" at epoch {state.epoch}, step {state.step}" if state.epoch is not None else ""
    message = f"interrupted by {name}{where}" + (
        f"; resume with: {command}" if command else "; no checkpoint was written yet: run it again"
    )
    return {
        "status": "interrupted",
        "error": message,
        "error_type": "Interrupted",
        "interrupt/signal": name,
        "interrupt/ckpt": state.ckpt,
        "interrupt/resume": command,
        "epochs": state.epoch,
        "steps": state.step,
    }
