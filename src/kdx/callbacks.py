"""kdx's Lightning callbacks, and the one seam through which a callback adds figures to metrics.json.

A callback that has headline figures of its own subclasses :class:`ReportsMetrics` and returns them
from :meth:`ReportsMetrics.report`; ``kdx-train`` merges every such report into ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from scipy.stats import binom
from torch import Tensor

from kdx.data.base import KDDataModule
from kdx.errors import DivergenceError, KDXError, NoLearningError


class ReportsMetrics:
    """Mixin for callbacks whose figures belong in ``metrics.json``."""

    def report(self) -> dict[str, Any]:
        raise NotImplementedError

    def verdict(self) -> KDXError | None:
        """The error a run that finished ends with (its ``status``, e.g. ``no_learning``), when this
        callback judges that the run did not do what was asked; None: no objection. The run's figures
        are recorded all the same."""
        return None


@dataclass(frozen=True)
class ChanceTest:
    """Is an accuracy significantly above chance on a labelled split?

    Chance is the best a model that ignores its input can score: always predicting the split's
    majority class, at rate ``p0 = majority / examples``. An accuracy ``a`` over ``n = examples``
    examples (``k = a·n`` correct) is *at chance* when a one-sided binomial test does not reject
    "no better than p0" at level ``alpha``: ``P(X >= k) >= alpha`` for ``X ~ Binomial(n, p0)``
    (``scipy.stats.binom``). Not 1/classes: on a 2-class split with 51 % of one class, predicting that
    class scores 51 %, and 1.5/classes would call an honest 74 % "chance".

    A split too small for the test to reject at ``alpha`` unless every example is right (``n - 1``
    correct is not significant) is not judged: there only a perfect score passes, so the test cannot
    tell a student that learned from one that did not. :attr:`judges` is False and :meth:`at_chance`
    says False. At 0.001 that is every 2-class split of 13 examples or fewer ((n + 1) / 2**n >= 0.001;
    12 examples: 13/4096 = 0.0032), and 8 examples of which 3 share a class.
    """

    examples: int
    majority: int
    alpha: float = 0.001

    @classmethod
    def of(cls, targets: Tensor, alpha: float = 0.001) -> ChanceTest:
        """The test for the labels ``targets`` of a split."""
        targets = targets.reshape(-1).long()
        majority = int(torch.bincount(targets).max()) if targets.numel() else 0
        return cls(int(targets.numel()), majority, alpha)

    @property
    def rate(self) -> float:
        """The majority class's share of the split, ``p0``."""
        return self.majority / self.examples if self.examples else 1.0

    @property
    def judges(self) -> bool:
        """Whether an accuracy below 100 % (``n - 1`` correct) can be significantly above chance."""
        return self.examples > 1 and self.p_value((self.examples - 1) / self.examples) < self.alpha

    def p_value(self, accuracy: float) -> float:
        """``P(X >= k)``, ``X ~ Binomial(n, p0)``, ``k = round(accuracy·n)`` correct examples."""
        correct = round(float(accuracy) * self.examples)
        return float(binom.sf(correct - 1, self.examples, self.rate))

    def at_chance(self, accuracy: float) -> bool:
        """True when the split is judged and ``accuracy`` is not significantly above :attr:`rate`."""
        return self.judges and self.p_value(accuracy) >= self.alpha

    def threshold(self) -> float | None:
        """The least accuracy that is significantly above chance; None when none is."""
        if not self.judges:
            return None
        correct = int(binom.isf(self.alpha, self.examples, self.rate))  # near the answer; settled below
        while binom.sf(correct - 1, self.examples, self.rate) >= self.alpha:
            correct += 1
        while correct > 0 and binom.sf(correct - 2, self.examples, self.rate) < self.alpha:
            correct -= 1
        return correct / self.examples

    def describe(self, accuracy: float) -> str:
        """``50.9 % is not significantly above ...``: the test's figures, for a message."""
        threshold = self.threshold()
        return (
            f"{100 * accuracy:.1f} % is not significantly above the majority class's "
            f"{100 * self.rate:.1f} % of the {self.examples} validation examples (one-sided binomial "
            f"test: p = {self.p_value(accuracy):.2g} >= {self.alpha:g}"
            + (f"; significant from {100 * threshold:.1f} %)" if threshold is not None else ")")
        )


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
    * A student whose best validation accuracy over the whole run is at chance — not significantly
      above the validation split's majority class (:class:`ChanceTest`: one-sided binomial test at
      level ``chance_alpha``, class counts read from the data module's
      :meth:`~kdx.data.base.KDDataModule.val_targets`) — ends the finished run with
      :class:`~kdx.errors.NoLearningError` (:meth:`verdict`): ``status: no_learning`` in
      metrics.json, with every figure the run reached, the checkpoints kept, the message in
      ``warnings`` and ``error``, exit code 2. Not judged: Lightning's ``fast_dev_run`` (a smoke
      test of one batch); a validation over part of the split (``trainer.limit_val_batches``), where
      the accuracy is not the split's; a split so small that only a perfect score could be
      significant (:attr:`ChanceTest.judges`: e.g. 2 classes, 13 examples or fewer); a data module
      that is not a :class:`~kdx.data.base.KDDataModule`.

    Defaults: ``loss_factor=1000`` is far above any legitimate rise we know of (a KD term ramped in
    by a warm-up multiplies the first loss by < 20), far below what a blown-up optimiser reaches
    (Adam at lr 1e9: 1e31). ``chance_alpha=0.001``: on SST-2's dev split (872 examples, 444 of one
    class: 50.9 %) accuracies from 56.3 % on are above chance; a collapse to the majority class
    (50.9 %) is at chance, an honest 74 % far above.
    """

    def __init__(self, loss_factor: float = 1000.0, reference_steps: int = 3, chance_alpha: float = 0.001):
        if not loss_factor > 1:
            raise ValueError(f"DivergenceMonitor: loss_factor={loss_factor} must be > 1")
        if not 0 < chance_alpha < 1:
            raise ValueError(f"DivergenceMonitor: chance_alpha={chance_alpha} must lie in (0, 1), e.g. 0.001")
        self.loss_factor = float(loss_factor)
        self.reference_steps = max(1, int(reference_steps))
        self.chance_alpha = float(chance_alpha)
        self._reference: Any = None
        self._seen = 0
        self._peak: Any = None
        self._epoch_reference: float | None = None
        self._best_acc: float | None = None
        self._test: ChanceTest | None = None
        self._validations = 0
        self._partial = False  # a validation saw part of the split only: not judged

    # a resumed run goes on judging against the first values of the whole run
    def state_dict(self) -> dict[str, Any]:
        reference = None if self._reference is None else float(self._reference)
        return {
            "reference": reference,
            "epoch_reference": self._epoch_reference,
            "best_acc": self._best_acc,
            "validations": self._validations,
            "partial": self._partial,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._validations or self._seen:
            return  # this run's own state wins: Lightning also restores callbacks for test(ckpt_path=best)
        if state_dict.get("reference") is not None:
            # only ever read as a float from here on: a CPU scalar whatever the run's device
            self._reference = torch.tensor(float(state_dict["reference"]))
            self._seen = self.reference_steps
        self._epoch_reference = state_dict.get("epoch_reference")
        self._best_acc = state_dict.get("best_acc")
        self._validations = int(state_dict.get("validations") or 0)
        self._partial = bool(state_dict.get("partial"))

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
        datamodule = trainer.datamodule
        if accuracy is None or not isinstance(datamodule, KDDataModule):
            return
        self._validations += 1
        loaders = trainer.val_dataloaders
        batches = len(loaders[0] if isinstance(loaders, (list, tuple)) else loaders)
        if sum(trainer.num_val_batches) < batches:  # trainer.limit_val_batches: part of the split
            self._partial = True
        if self._test is None:  # the split's labels are read once
            self._test = ChanceTest.of(datamodule.val_targets(), self.chance_alpha)
        value = float(accuracy)
        self._best_acc = value if self._best_acc is None else max(self._best_acc, value)

    def verdict(self) -> NoLearningError | None:
        """:class:`~kdx.errors.NoLearningError` when the student's best validation accuracy is at
        chance (see the class docstring for what is not judged)."""
        best, test = self._best_acc, self._test
        if best is None or test is None or self._partial or not test.at_chance(best):
            return None
        return NoLearningError(
            f"the student stayed at chance level: its best validation accuracy over {self._validations} "
            f"validations, {test.describe(best)}; the run learned nothing — check optim.optimizer.lr, the "
            "method's loss weights and the data (the level is callbacks.divergence.chance_alpha)"
        )

    def report(self) -> dict[str, Any]:
        verdict = self.verdict()
        if verdict is None:
            return {}
        logging.getLogger("kdx").warning("kdx: warning: %s", verdict)
        return {"warnings": [str(verdict)]}


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
