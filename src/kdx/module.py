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

from kdx.methods.base import DistillationMethod
from kdx.metrics import FidelityMetrics
from kdx.models.adapter import as_feature_model
from kdx.models.base import EMBEDDING, LOGITS

# Horizon arguments of common schedulers, filled from the run's length when the config leaves them out.
_EPOCH_HORIZON = ("T_max", "total_iters")
_STEP_HORIZON = ("total_steps",)


class NonFiniteLossError(RuntimeError):
    pass


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
    ):
        super().__init__()
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
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor | None:
        terms = self.method.training_step(batch, self)
        loss = terms["loss"]
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(terms: {', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                "lower optim.optimizer.lr, set trainer.gradient_clip_val, or check the method's weights"
            )
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in terms.items()},
            on_step=True,
            on_epoch=True,
            batch_size=batch[0].shape[0],
        )
        return loss if self.automatic_optimization else None

    def on_fit_start(self) -> None:
        self.method.on_fit_start(self)

    def on_train_epoch_start(self) -> None:
        self.method.on_train_epoch_start(self)

    def on_train_epoch_end(self) -> None:
        self.method.on_train_epoch_end(self)

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
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, sync_dist=False)
        self.val_metrics.reset()
        self.method.on_validation_epoch_end(self)

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.compute().items()}, sync_dist=False)
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
            configs += self.method.teacher_optimizers(self.teacher)
        return configs[0] if len(configs) == 1 else configs

    def _build_scheduler(self, factory: Callable[..., Any], optimizer: torch.optim.Optimizer):
        """Fill ``T_max`` / ``total_iters`` / ``total_steps`` from the run's length when left unset."""
        target = getattr(factory, "func", factory)
        bound = getattr(factory, "keywords", {})
        params = inspect.signature(target).parameters
        epochs = max(1, self.trainer.max_epochs or 1)
        steps = self.trainer.estimated_stepping_batches
        horizon = epochs if self._scheduler_interval == "epoch" else steps
        extra = {}
        for name in _EPOCH_HORIZON:
            if name in params and name not in bound:
                extra[name] = horizon if math.isfinite(horizon) else epochs
        for name in _STEP_HORIZON:
            if name in params and name not in bound:
                extra[name] = steps
        return factory(optimizer, **extra)
