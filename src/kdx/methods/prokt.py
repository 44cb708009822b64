"""``prokt``: Shi, Song, Zhou, Li & Li, *Follow Your Path: a Progressive Method for Knowledge
Distillation* (ProKT, arXiv 2107.09305, ECML-PKDD 2021). Official (text) code: wxsh1213/prokt_text.

A converged teacher is a hard target for a small student. ProKT trains the teacher *with* the
student and makes each teacher update a local target the student can follow (an approximate
mirror-descent step): the teacher is pulled back towards the student while it learns the task.
The teacher is the one kdx trains (``trains_teacher``) and is checkpointed with the run.

Each training step, in the official code's order (manual optimization, two optimizers):

1. student snapshot: ``z_s = student(x)`` in ``eval()``, under ``no_grad`` (skipped when λ = 0);
2. teacher step, teacher in ``train()``, T = 1, its own optimizer, scheduler and clipping::

       L_T = (1-λ)·CE(z_t, y) + λ·KL(softmax(z_s) ‖ softmax(z_t))        (z_s detached)

3. teacher snapshot: ``z_t' = teacher(x)`` in ``eval()``, under ``no_grad``;
4. student step, student in ``train()``, with its own clipping::

       L_S = (1-α)·CE(z_s, y) + α·T²·KL(softmax(z_t'/T) ‖ softmax(z_s/T))

Schedulers: Lightning does not step them under manual optimization, so this method does:
``interval: step`` ones after every training step, ``interval: epoch`` ones in
``on_train_epoch_end`` (the student's ``optim`` recipe is epoch-interval by default; the teacher's
scheduler, ``teacher_scheduler``, decays per step over the run). Both optimizers use Lightning's
optimizer wrappers, so ``trainer.global_step`` counts 2 steps per batch.

Teacher start: ``teacher_init=random`` (default) builds the teacher from random initialisation and
loads nothing; ``teacher_init=checkpoint`` loads ``teacher.ckpt`` (lower ``teacher.min_acc`` for an
early checkpoint). Start ProKT from random init or an EARLY checkpoint, never from a converged
teacher: following the teacher's training path is the method; a converged teacher (which is what
``teacher.ckpt=auto`` trains) defeats it. ``zero_init_heads`` zeroes both classifier heads at the
start (the official ``--init_classifier_to_zero``), so both predict the uniform distribution at
step 0.

Defaults: λ (``move_back_weight``) = 0.4 (official BERT-base → BERT-6 setting); student loss
α = 0.9, T = 4 (the RepDistiller KD convention, methods.md §5.4); teacher: Adam, lr 0.01 (kdx's
default ``optim=adam`` recipe, so teacher and student train alike on MNIST-1D), cosine decay per
step, no weight decay; gradient-norm clipping at 1.0 for both (HF ``max_grad_norm`` in the
official code). For CIFAR-100 use the student's SGD recipe for the teacher too:
``method.teacher_optimizer=sgd method.teacher_lr=0.05 method.teacher_weight_decay=5e-4``.
The official text setting is ``method.alpha=1.0 method.temperature=1.0 method.zero_init_heads=true``
with AdamW (``method.teacher_optimizer=adamw``) and a linear decay (``method.teacher_scheduler=linear``).

Deviations from the paper: the image-classification recipe of the paper could not be read (only
the text code was found), so the student's CE + T = 4 loss, the teacher's optimizer/lr/schedule,
random teacher init and clipping the student at 1.0 are our choices; the optional dual
(Lagrangian) variant of the official code is not implemented (its code path is broken). The
teacher snapshot uses eval-mode BatchNorm (the official order; the text models have no BatchNorm),
whose running statistics lag behind a teacher trained from scratch for the first few dozen steps.
Under DDP the teacher is wrapped for gradient reduction too (the one method that does so), and the
two backward passes per step need ``trainer.strategy=ddp_find_unused_parameters_true`` (checked at
fit start); replicas were checked to stay in sync with ``trainer=ddp_sim``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.errors import KDXError
from kdx.methods.base import (
    DistillationMethod,
    Terms,
    check_kd_weights,
    kd_loss,
    register_method,
    soft_cross_entropy,
)

log = logging.getLogger(__name__)

TEACHER_INITS = ("random", "checkpoint")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "linear")


def teacher_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(softmax(z_s) ‖ softmax(z_t))`` at T = 1, batchmean; the student side is detached, so the
    gradient reaches only the teacher logits (ProKT's "move back" term)."""
    return soft_cross_entropy(teacher_logits, F.softmax(student_logits.detach(), dim=-1), 1.0)


@contextlib.contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model`` in train or eval mode inside the block; every submodule's mode restored after."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, was in saved:
            m.training = was


@register_method("prokt")
class ProKT(DistillationMethod):
    trains_teacher = True
    manual_optimization = True

    def __init__(
        self,
        move_back_weight: float = 0.4,
        alpha: float = 0.9,
        temperature: float = 4.0,
        teacher_init: str = "random",
        zero_init_heads: bool = False,
        teacher_optimizer: str = "adam",
        teacher_lr: float = 0.01,
        teacher_momentum: float = 0.9,
        teacher_weight_decay: float = 0.0,
        teacher_scheduler: str = "cosine",
        teacher_max_grad_norm: float = 1.0,
        student_max_grad_norm: float = 1.0,
    ):
        super().__init__()
        if not 0.0 <= move_back_weight <= 1.0:
            raise ValueError(f"method.move_back_weight={move_back_weight} (λ) must lie in [0, 1]")
        check_kd_weights(alpha, temperature)
        if teacher_init not in TEACHER_INITS:
            raise ValueError(
                f"method.teacher_init={teacher_init!r} must be one of {', '.join(TEACHER_INITS)}"
            )
        if teacher_optimizer not in OPTIMIZERS:
            raise ValueError(
                f"method.teacher_optimizer={teacher_optimizer!r} must be one of {', '.join(OPTIMIZERS)}"
            )
        if teacher_scheduler not in SCHEDULERS:
            raise ValueError(
                f"method.teacher_scheduler={teacher_scheduler!r} must be one of {', '.join(SCHEDULERS)}"
            )
        if teacher_lr <= 0:
            raise ValueError(f"method.teacher_lr={teacher_lr} must be > 0")
        self.move_back_weight = move_back_weight
        self.alpha = alpha
        self.temperature = temperature
        self.teacher_init = teacher_init
        self.zero_init_heads = zero_init_heads
        self.teacher_optimizer = teacher_optimizer
        self.teacher_lr = teacher_lr
        self.teacher_momentum = teacher_momentum
        self.teacher_weight_decay = teacher_weight_decay
        self.teacher_scheduler = teacher_scheduler
        self.teacher_max_grad_norm = teacher_max_grad_norm
        self.student_max_grad_norm = student_max_grad_norm
        self._total_steps = math.inf  # the teacher scheduler's horizon, set in on_fit_start

    # -- setup --------------------------------------------------------------------------------
    def uses_teacher_weights(self) -> bool:
        return self.teacher_init == "checkpoint"

    def setup(self, student: nn.Module, teacher: nn.Module | None, datamodule: Any) -> None:
        if self.zero_init_heads:
            for model in (student, teacher):
                head = model.classifier
                with torch.no_grad():
                    head.weight.zero_()
                    if head.bias is not None:
                        head.bias.zero_()

    def teacher_optimizers(self, teacher: nn.Module) -> list[dict]:
        params = [p for p in teacher.parameters() if p.requires_grad]
        if self.teacher_optimizer == "sgd":
            opt = torch.optim.SGD(
                params,
                lr=self.teacher_lr,
                momentum=self.teacher_momentum,
                weight_decay=self.teacher_weight_decay,
            )
        elif self.teacher_optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.teacher_lr, weight_decay=self.teacher_weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.teacher_lr, weight_decay=self.teacher_weight_decay)
        config: dict[str, Any] = {"optimizer": opt}
        if self.teacher_scheduler != "none":
            # a closure (not a bound method) so the scheduler's state_dict stays plain data
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self._lr_factor(step))
            config["lr_scheduler"] = {"scheduler": sched, "interval": "step", "name": "lr-teacher"}
        return [config]

    def _lr_factor(self, step: int) -> float:
        if not math.isfinite(self._total_steps) or self._total_steps <= 0:
            return 1.0
        progress = min(1.0, step / self._total_steps)
        if self.teacher_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    def on_fit_start(self, host: Any) -> None:
        trainer = host.trainer
        self._total_steps = float(trainer.estimated_stepping_batches)
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise KDXError(
                    "method=prokt steps its schedulers itself and does not support ReduceLROnPlateau; "
                    "pick a scheduler that needs no metric"
                )
            if config.frequency != 1:
                raise KDXError(
                    f"method=prokt steps schedulers every {config.interval}; frequency "
                    f"{config.frequency} is not supported"
                )
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if trainer.world_size > 1 and ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters"):
            raise KDXError(
                "method=prokt under DDP makes two backward passes per step over disjoint parameter "
                "sets; use trainer.strategy=ddp_find_unused_parameters_true "
                "(or ddp_spawn_find_unused_parameters_true)"
            )
        if self.teacher_init == "checkpoint":
            log.info(
                "method=prokt starts from teacher.ckpt: it should be an EARLY checkpoint, not a converged teacher"
            )

    # -- the step -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], host: Any) -> Terms:
        x, y, _ = batch
        student_opt, teacher_opt = self._optimizers(host)
        student_logits = self.student_snapshot(host, x) if self.move_back_weight > 0 else None
        teacher_terms = self.teacher_step(host, x, y, student_logits, teacher_opt)
        teacher_logits = self.teacher_snapshot(host, x)
        terms = self.student_step(host, x, y, teacher_logits, student_opt)
        self.step_schedulers(host, "step")
        return {**terms, **{f"teacher/{k}": v for k, v in teacher_terms.items()}}

    def student_snapshot(self, host: Any, x: Tensor) -> Tensor:
        with torch.no_grad(), mode(host.student, False):
            return host.student(x, self.reads).logits.detach()

    def teacher_snapshot(self, host: Any, x: Tensor) -> Tensor:
        with torch.no_grad(), mode(host.teacher, False):
            return host.teacher(x, self.reads).logits.detach()

    def teacher_loss(self, teacher_logits: Tensor, y: Tensor, student_logits: Tensor | None) -> Terms:
        ce = F.cross_entropy(teacher_logits, y)
        if student_logits is None or self.move_back_weight == 0:
            return {"loss": ce, "ce": ce}
        kl = teacher_kl(student_logits, teacher_logits)
        return {"loss": (1 - self.move_back_weight) * ce + self.move_back_weight * kl, "ce": ce, "kl": kl}

    def student_loss(self, student_logits: Tensor, y: Tensor, teacher_logits: Tensor) -> Terms:
        ce = F.cross_entropy(student_logits, y)
        kd = kd_loss(student_logits, teacher_logits.detach(), self.temperature)
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd, "ce": ce, "kd": kd}

    def teacher_step(
        self, host: Any, x: Tensor, y: Tensor, student_logits: Tensor | None, optimizer: Any
    ) -> Terms:
        """One update of the teacher towards the labels and back towards the student snapshot."""
        with mode(host.teacher, True):
            terms = self.teacher_loss(host.teacher(x, self.reads).logits, y, student_logits)
            self._update(host, optimizer, terms["loss"], self.teacher_max_grad_norm)
        return {k: v.detach() for k, v in terms.items()}

    def student_step(self, host: Any, x: Tensor, y: Tensor, teacher_logits: Tensor, optimizer: Any) -> Terms:
        """One KD update of the student towards the updated teacher's snapshot."""
        with mode(host.student, True):
            terms = self.student_loss(host.student(x, self.reads).logits, y, teacher_logits)
            self._update(host, optimizer, terms["loss"], self.student_max_grad_norm)
        return {k: v.detach() for k, v in terms.items()}

    @staticmethod
    def _update(host: Any, optimizer: Any, loss: Tensor, max_grad_norm: float) -> None:
        optimizer.zero_grad()
        host.manual_backward(loss)
        if max_grad_norm and max_grad_norm > 0:
            host.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()

    @staticmethod
    def _optimizers(host: Any) -> tuple[Any, Any]:
        optimizers = host.optimizers()
        if not isinstance(optimizers, (list, tuple)) or len(optimizers) != 2:
            raise RuntimeError(
                "method=prokt needs two optimizers (student, teacher); the module gave "
                f"{1 if not isinstance(optimizers, (list, tuple)) else len(optimizers)}"
            )
        return optimizers[0], optimizers[1]

    # -- schedulers ---------------------------------------------------------------------------
    def on_train_epoch_end(self, host: Any) -> None:
        self.step_schedulers(host, "epoch")

    @staticmethod
    def step_schedulers(host: Any, interval: str) -> None:
        """Step the schedulers of the given interval (manual optimization: Lightning does not)."""
        try:
            trainer = getattr(host, "trainer", None)
        except RuntimeError:  # a LightningModule not attached to a trainer
            return
        for config in getattr(trainer, "lr_scheduler_configs", None) or []:
            if config.interval == interval:
                config.scheduler.step()
