"""kdx's Lightning callbacks, and the one seam through which a callback adds figures to metrics.json.

A callback that has headline figures of its own subclasses :class:`ReportsMetrics` and returns them
from :meth:`ReportsMetrics.report`; ``kdx-train`` merges every such report into ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from kdx.errors import DivergenceError


class ReportsMetrics:
    """Mixin for callbacks whose figures belong in ``metrics.json``."""

    def report(self) -> dict[str, Any]:
        raise NotImplementedError


class TrainingThroughput(L.Callback, ReportsMetrics):
    """Training samples per second over the training batches of each epoch (the first epoch is warm-up).

    Named apart from Lightning's own ``ThroughputMonitor``; times with the host clock only at batch
    boundaries (no device sync), so on a GPU it measures what the loop sustains.
    """

    def __init__(self):
        self.samples = 0
        self.seconds = 0.0
        self._epoch_start: float | None = None
        self._epoch_samples = 0
        self._epochs = 0
        self._last = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start, self._epoch_samples = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._epoch_start is None:
            self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._epoch_samples += batch[1].shape[0]  # y: x may be a mapping (text)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._epoch_start is None:
            return
        self._epochs += 1
        if self._epochs == 2:  # drop the warm-up epoch once a second one exists
            self.samples, self.seconds = 0, 0.0
        self.samples += self._epoch_samples * trainer.world_size
        self.seconds += self._last - self._epoch_start

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None

    def report(self) -> dict[str, Any]:
        return {"throughput/train_samples_per_s": self.samples_per_s}


class DivergenceMonitor(L.Callback, ReportsMetrics):
    """No silent success for a run that learned nothing.

    * The training loss rising above ``loss_factor`` times its first values (the least of the first
      ``reference_steps`` step losses, floored at 1.0 so that a near-zero start is not a hair
      trigger) stops the run with :class:`~kdx.errors.DivergenceError`: ``status: diverged`` in
      metrics.json, exit code 2. Read every ``trainer.log_every_n_steps`` steps and at each epoch's
      end from a device-side running maximum (no host sync per step); non-finite losses are left
      to the module's NaN check, which names their source. Methods with manual optimisation return
      no loss per step; their epoch means (``train/loss_epoch``) are compared instead.
    * Validation accuracy of the student below ``chance_factor`` × chance (1 / classes) at every
      validation of the run is a warning in metrics.json and the summary (the run itself finished).
      Lightning's ``fast_dev_run`` (a smoke test of one batch) is not judged.

    Defaults: ``loss_factor=1000`` is far above any legitimate rise we know of (a KD term ramped in
    by a warm-up multiplies the first loss by < 20), far below what a blown-up optimiser reaches
    (Adam at lr 1e9: 1e31).
    """

    def __init__(self, loss_factor: float = 1000.0, reference_steps: int = 3, chance_factor: float = 1.5):
        if not loss_factor > 1:
            raise ValueError(f"DivergenceMonitor: loss_factor={loss_factor} must be > 1")
        self.loss_factor = float(loss_factor)
        self.reference_steps = max(1, int(reference_steps))
        self.chance_factor = float(chance_factor)
        self._reference: Any = None
        self._seen = 0
        self._peak: Any = None
        self._epoch_reference: float | None = None
        self._best_acc: float | None = None
        self._chance: float | None = None
        self._validations = 0

    # a resumed run goes on judging against the first values of the whole run
    def state_dict(self) -> dict[str, Any]:
        reference = None if self._reference is None else float(self._reference)
        return {
            "reference": reference,
            "epoch_reference": self._epoch_reference,
            "best_acc": self._best_acc,
            "chance": self._chance,
            "validations": self._validations,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._validations or self._seen:
            return  # this run's own state wins: Lightning also restores callbacks for test(ckpt_path=best)
        if state_dict.get("reference") is not None:
            # only ever read as a float from here on: a CPU scalar whatever the run's device
            self._reference = torch.tensor(float(state_dict["reference"]))
            self._seen = self.reference_steps
        self._epoch_reference = state_dict.get("epoch_reference")
        self._best_acc, self._chance = state_dict.get("best_acc"), state_dict.get("chance")
        self._validations = int(state_dict.get("validations") or 0)

    @staticmethod
    def _step_loss(outputs: Any) -> Any:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        return loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = self._step_loss(outputs)
        if loss is None:
            return
        finite = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))  # NaN: the module's check
        if self._seen < self.reference_steps:
            self._reference = finite if self._reference is None else torch.minimum(self._reference, finite)
            self._seen += 1
            return
        self._peak = finite if self._peak is None else torch.maximum(self._peak, finite)
        # on the steps where the module's NaN check and the logger read values anyway
        if (batch_idx + 1) % max(1, int(trainer.log_every_n_steps or 1)) == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._check(trainer)
        if self._reference is None:  # manual optimisation: compare the epochs' mean losses
            epoch_loss = trainer.callback_metrics.get("train/loss_epoch")
            if epoch_loss is not None:
                value = float(epoch_loss)
                if self._epoch_reference is None:
                    self._epoch_reference = value
                else:
                    self._raise_if_diverged(trainer, value, self._epoch_reference, "epoch mean")

    def _check(self, trainer) -> None:
        if self._peak is None or self._reference is None:
            return
        peak, reference = float(self._peak), float(self._reference)  # the one host sync
        self._peak = None
        self._raise_if_diverged(trainer, peak, reference, "step")

    def _raise_if_diverged(self, trainer, loss: float, reference: float, what: str) -> None:
        threshold = self.loss_factor * max(abs(reference), 1.0)
        if trainer.strategy.reduce_boolean_decision(loss > threshold, all=False):
            raise DivergenceError(
                f"the training loss diverged: {what} loss {loss:.3g} at epoch {trainer.current_epoch} "
                f"(global step {trainer.global_step}) is over {self.loss_factor:g}x its first value "
                f"{reference:.3g}; lower optim.optimizer.lr or set trainer.gradient_clip_val "
                "(the threshold is callbacks.divergence.loss_factor)"
            )

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        accuracy = trainer.callback_metrics.get("val/student/acc")
        if accuracy is None:
            return
        self._validations += 1
        self._chance = 1.0 / int(pl_module.num_classes)
        value = float(accuracy)
        self._best_acc = value if self._best_acc is None else max(self._best_acc, value)

    def report(self) -> dict[str, Any]:
        best, chance = self._best_acc, self._chance
        if best is None or chance is None or best >= self.chance_factor * chance:
            return {}
        warning = (
            f"the student stayed at chance level: best validation accuracy {100 * best:.1f} % over "
            f"{self._validations} validations (chance: {100 * chance:.1f} %); the run learned nothing — "
            "check optim.optimizer.lr, the method's loss weights and the data"
        )
        logging.getLogger("kdx").warning("kdx: warning: %s", warning)
        return {"warnings": [warning]}


class EpochLog(L.Callback):
    """One line per epoch in the run's log (``train.log``): what a multirun without progress bars,
    or a person reading the log afterwards, needs to follow training."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:  # one line per epoch under DDP
            return
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        # validation ends before the epoch's mean loss exists: the last step's loss stands in for it
        for key in ("train/loss_step", "val/student/acc", "val/teacher/acc", "val/fidelity/kl"):
            if key in metrics:
                value = float(metrics[key])
                parts.append(f"{key} {100 * value:.2f} %" if key.endswith("/acc") else f"{key} {value:.4g}")
        logging.getLogger("kdx").info("; ".join(parts))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


class TimeEstimate(L.Callback):
    """Says once, from the speed of the first training steps, how long the run will take: always
    for a teacher run (``training teacher cnn1d for 25 epochs, ~1 min at this speed``), as a warning
    for any run estimated at ``long_s`` or more (a CIFAR recipe on a CPU). The first step (warm-up)
    is not timed; validation is not counted."""

    def __init__(self, role: str = "train", name: str = "model", steps: int = 10, long_s: float = 900.0):
        self.role, self.name, self.steps, self.long_s = role, name, steps, long_s
        self._start: float | None = None
        self._timed = 0
        self._said = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._said or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self._start is None:
            self._start = time.perf_counter()
            return
        self._timed += 1
        per_epoch = trainer.num_training_batches
        if self._timed < self.steps and batch_idx + 1 < per_epoch:
            return
        if not isinstance(per_epoch, int) or not trainer.max_epochs or trainer.max_epochs < 0:
            self._said = True  # an iterable without a length or no epoch limit: nothing to extrapolate
            return
        per_step = (time.perf_counter() - self._start) / self._timed
        left_steps = per_epoch * trainer.max_epochs - trainer.global_step
        estimate = per_step * left_steps
        self._said = True
        device = trainer.strategy.root_device.type
        what = (
            f"training teacher {self.name} for {trainer.max_epochs} epochs"
            if self.role == "teacher"
            else f"this run ({self.name}, {trainer.max_epochs} epochs)"
        )
        speed = f"{_duration(estimate)} at this speed ({device}, {per_step:.2f} s a step)"
        log = logging.getLogger("kdx")
        if estimate < self.long_s:
            if self.role == "teacher":
                log.info("%s, %s", what, speed)
            return
        shorter = (
            "teacher.train.epochs=<n> or a trained teacher.ckpt=<file>"
            if self.role == "teacher"
            else "trainer.max_epochs=<n>"
        )
        log.warning(
            "kdx: warning: %s will take %s; for a shorter run: %s, or a faster device", what, speed, shorter
        )
