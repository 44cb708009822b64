"""DistillationModule: holds student, teacher, method and metrics; knows no method by name.

``training_step`` hands the batch to ``method.training_step`` and logs the named loss terms it
returns. Validation and test measure the student, the teacher and the distance between them
(:mod:`kdx.metrics`). The teacher stays in ``eval()`` with gradients off and out of every
optimizer unless the method declares ``trains_teacher``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kdx.errors import NonFiniteLossError
from kdx.methods.base import DistillationMethod
from kdx.metrics import FidelityMetrics
from kdx.models.adapter import as_feature_model
from kdx.models.base import EMBEDDING, LOGITS

# Horizon arguments of common schedulers, filled from the run's length when the config leaves them out.
_EPOCH_HORIZON = ("T_max", "total_iters")
_STEP_HORIZON = ("total_steps",)


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        method: DistillationMethod,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        teacher: nn.Module | None = None,
        student_stages: list[str] | None = None,
        teacher_stages: list[str] | None = None,
        nonfinite_check_every: int = 10,
    ):
        super().__init__()
        self.nonfinite_check_every = max(1, int(nonfinite_check_every))
        self._nonfinite: Tensor | None = None
        self.student = as_feature_model(student, student_stages)
        self.teacher = None if teacher is None else as_feature_model(teacher, teacher_stages)
        self.method = method
        self.num_classes = num_classes
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._scheduler_interval = scheduler_interval
        self.automatic_optimization = not method.manual_optimization
        if method.needs_teacher and self.teacher is None:
            raise ValueError(
                f"method '{method.name}' needs a teacher, but teacher=none; "
                "pick a teacher (e.g. teacher=cnn1d) or method=none"
            )
        if self.teacher is not None:
            self.teacher.requires_grad_(method.trains_teacher)
            self.teacher.train(method.trains_teacher)
        has_teacher = self.teacher is not None
        self.val_metrics = FidelityMetrics(num_classes, has_teacher)
        self.test_metrics = FidelityMetrics(num_classes, has_teacher)

    # -- modes --------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None and not self.method.trains_teacher:
            self.teacher.eval()  # BN statistics and dropout of a fixed teacher never change
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.method.setup(self.student, self.teacher, getattr(self.trainer, "datamodule", None))

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Any, Tensor, Tensor], batch_idx: int) -> Tensor | None:
        terms = self.method.training_step(batch, self)
        loss = terms["loss"]
        # a device-side flag, read every `nonfinite_check_every` steps: no host sync per step
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        batch_size = batch[1].shape[0]  # y is always a tensor; x may be a mapping (text)
        self.log(
            "train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in terms.items() if k != "loss"},
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
        )
        return loss if self.automatic_optimization else None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.nonfinite_check_every == 0:
            self._check_finite()

    def _check_finite(self) -> None:
        """Stop on a non-finite loss seen by any rank since the last check; every rank decides alike."""
        if self._nonfinite is None:
            return
        seen = bool(self._nonfinite)  # the one host sync, every `nonfinite_check_every` steps
        self._nonfinite = None
        if self.trainer.strategy.reduce_boolean_decision(seen, all=False):
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at epoch {self.current_epoch} "
                f"(seen by global step {self.global_step}, "
                "on at least one device); lower optim.optimizer.lr, set trainer.gradient_clip_val, "
                "or check the method's loss weights and the inputs"
            )

    def on_fit_start(self) -> None:
        self.method.on_fit_start(self)

    def on_train_epoch_start(self) -> None:
        self.method.on_train_epoch_start(self)

    def on_train_epoch_end(self) -> None:
        self._check_finite()
        self.method.on_train_epoch_end(self)

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a frozen teacher is provided again by teacher.ckpt at load time: don't copy it into every file
        if self.teacher is not None and not self.method.trains_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if self.teacher is not None and not any(k.startswith("teacher.") for k in state):
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate(self, batch, metrics: FidelityMetrics) -> None:
        x, y, _ = batch
        reads = (LOGITS, EMBEDDING)
        student_out = self.student(x, reads)
        teacher_out = None if self.teacher is None else self.teacher(x, reads)
        metrics.update(
            student_out.logits,
            None if teacher_out is None else teacher_out.logits,
            y,
            student_out.embedding,
            None if teacher_out is None else teacher_out.embedding,
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": v for k, v in self.val_metrics.compute().items()}
        accuracy = values.pop("val/student/acc")
        # torchmetrics already synced these: every rank holds the same value, so the mean over
        # ranks (sync_dist) is exact, costs one small reduce per epoch and keeps Lightning quiet
        self.log("val/student/acc", accuracy, prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        self.val_metrics.reset()
        self.method.on_validation_epoch_end(self)

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.compute().items()}, sync_dist=True)
        self.test_metrics.reset()

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in [*self.student.parameters(), *self.method.parameters()] if p.requires_grad]
        optimizer = self._optimizer(params)
        configs: list[dict] = [{"optimizer": optimizer}]
        if self._scheduler is not None:
            configs[0]["lr_scheduler"] = {
                "scheduler": self._build_scheduler(self._scheduler, optimizer),
                "interval": self._scheduler_interval,
            }
        if self.method.trains_teacher and self.teacher is not None:
            configs += self.method.teacher_optimizers(self.teacher, self._build_scheduler)
        return configs[0] if len(configs) == 1 else configs

    def _build_scheduler(
        self, factory: Callable[..., Any], optimizer: torch.optim.Optimizer, interval: str | None = None
    ):
        """Fill ``T_max`` / ``total_iters`` / ``total_steps`` from the run's length when left unset
        (``interval``: the scheduler's own, when it is not the student's, e.g. ProKT's teacher)."""
        target = getattr(factory, "func", factory)
        bound = getattr(factory, "keywords", {})
        params = inspect.signature(target).parameters
        epochs = max(1, self.trainer.max_epochs or 1)
        steps = self.trainer.estimated_stepping_batches
        horizon = epochs if (interval or self._scheduler_interval) == "epoch" else steps
        extra = {}
        for name in _EPOCH_HORIZON:
            if name in params and name not in bound:
                extra[name] = horizon if math.isfinite(horizon) else epochs
        for name in _STEP_HORIZON:
            if name in params and name not in bound:
                extra[name] = steps
        return factory(optimizer, **extra)
