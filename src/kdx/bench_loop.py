"""What every kdx-bench pair shares: the clock, the step timer, the plain loop's KD step, the Trainer,
the bare LightningModule doing that step (Lightning's floor), and the per-step summary of the sides."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

_CLOCK = {"fn": time.perf_counter}


def _clock() -> float:
    """The bench's clock: this thread's CPU time on a CPU run (``clock: auto``), so that time the
    thread spends descheduled on a shared machine is not counted; wall time on a GPU; ``process``:
    the CPU time of all the process's threads (several intra-op threads on a shared machine)."""
    return _CLOCK["fn"]()


def _use_clock(cfg: DictConfig, device: torch.device) -> str:
    name = str(cfg.get("clock", "auto"))
    if name == "auto":
        name = "thread" if device.type == "cpu" else "wall"
    clocks = {"thread": time.thread_time, "process": time.process_time, "wall": time.perf_counter}
    if name not in clocks:
        raise ValueError(f"clock={name!r}: choose auto, thread, process or wall")
    _CLOCK["fn"] = clocks[name]
    return name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer(L.Callback):
    """Times the steps of the last epoch after its first ``warmup`` batches; keeps each step's time
    and, with ``keep_batches``, each timed step's batch (as the step received it, on the device)."""

    def __init__(self, warmup: int, device: torch.device, epoch: int = 0, keep_batches: bool = False):
        self.warmup, self.device, self.epoch, self.keep_batches = warmup, device, epoch, keep_batches
        self.start = self.end = 0.0
        self.samples = 0
        self.stamps: list[float] = []
        self.batches: list[Any] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx >= self.warmup:
            _sync(self.device)
            now = _clock()
            if batch_idx == self.warmup:
                self.start = now
            self.stamps.append(now)
            if self.keep_batches:
                self.batches.append(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx >= self.warmup:
            self.samples += batch[1].shape[0]
            _sync(self.device)
            self.end = _clock()

    def step_ms(self) -> float:
        """The median time from one step's start to the next's (the loop's whole cost per step)."""
        return 1000 * median_step(self.stamps)


def median_step(stamps: list[float]) -> float:
    """The median time between consecutive step starts (``stamps``: each step's start, then the end)."""
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def timed_loop(
    batches: Iterable[Any], step: Callable[[int, Any, Any], None], warmup: int, device
) -> list[float]:
    """The plain loops' clock: ``step(i, x, y)`` over ``batches`` of ``(x, y, index)``, stamped at the
    start of every step from ``warmup`` on and once after the last (a device sync before each stamp)."""
    stamps = []
    for i, (x, y, _) in enumerate(batches):
        if i >= warmup:
            _sync(device)
            stamps.append(_clock())
        step(i, x, y)
    _sync(device)
    stamps.append(_clock())
    return stamps


def _trainer(cfg, callback: L.Callback, max_epochs: int, precision: str | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=precision or cfg.precision,
        max_epochs=max_epochs,
        logger=False,
        # kdx-train's default: the loggers write (and kdx calls self.log) every 10 steps
        log_every_n_steps=int(cfg.get("log_every_n_steps", 10)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )


def _kd_step(student, teacher, x, y, teacher_logits=None):
    logits = student(x)
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = teacher(x)
    kl = F.kl_div(F.log_softmax(logits / 4, -1), F.softmax(teacher_logits / 4, -1), reduction="batchmean")
    return 0.1 * F.cross_entropy(logits, y) + 0.9 * 16 * kl


class BareKD(L.LightningModule):
    """What a user would write by hand in Lightning: the same KD step, nothing logged."""

    def __init__(self, student, teacher, optimizer):
        super().__init__()
        self.student, self.teacher, self._optimizer = student, teacher.eval().requires_grad_(False), optimizer

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return _kd_step(self.student, self.teacher, x, y)

    def configure_optimizers(self):
        return self._optimizer(self.student.parameters())


# kdx / plain = p / (p + a) for a plain step of p ms and a fixed cost of a ms per step: the goal of 0.97
# holds from p = (0.97 / 0.03) · a on
GOAL_RATIO = 0.97


def per_step(rates: dict[str, list[float]], batch_size: int, base: str = "plain") -> dict[str, Any]:
    """What each side costs a step against ``base``, from its samples/s in each round (``rates``; the
    sides of a round ran back to back, so a round's ratio is a paired one).

    Per side other than ``base``: ``step_ms_<side>`` (median over rounds), ``added_ms_<side>`` (its
    median step minus ``base``'s: the fixed cost it adds), ``rounds_<side>`` (its ratio over ``base``
    in each round: the spread a single figure hides) and ``goal_step_ms_<side>``: how long ``base``'s
    step must be for that fixed cost to leave the side at :data:`GOAL_RATIO` of it."""
    steps = {side: 1000 * batch_size / statistics.median(values) for side, values in rates.items()}
    out: dict[str, Any] = {f"step_ms_{base}": round(steps[base], 4)}
    for side, values in rates.items():
        if side == base:
            continue
        added = steps[side] - steps[base]
        out[f"step_ms_{side}"] = round(steps[side], 4)
        out[f"added_ms_{side}"] = round(added, 4)
        out[f"rounds_{side}"] = [round(v / b, 4) for v, b in zip(values, rates[base])]
        out[f"goal_step_ms_{side}"] = round(max(0.0, added) * GOAL_RATIO / (1 - GOAL_RATIO), 2)
    return out


def per_step_lines(result: dict[str, Any], sides: dict[str, str], base: str = "plain") -> list[str]:
    """The table's lines for :func:`per_step`'s fields: ``sides`` maps a side to its label."""
    lines = [
        f"per step: {base} loop {result[f'step_ms_{base}']:.3f} ms; added over it (ms), the ratio in each round"
    ]
    for side, label in sides.items():
        rounds = result[f"rounds_{side}"]
        lines.append(
            f"  {label:<34}{result[f'added_ms_{side}']:>+8.3f} ms   rounds {min(rounds):.4f}-{max(rounds):.4f}"
            f"   {GOAL_RATIO} of the plain loop from a {result[f'goal_step_ms_{side}']:.1f} ms step on"
        )
    return lines
