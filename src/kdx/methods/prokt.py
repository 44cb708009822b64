"""``prokt``: Shi, Song, Zhou, Li & Li, *Follow Your Path: a Progressive Method for Knowledge
Distillation* (ProKT, arXiv 2107.09305, ECML-PKDD 2021). Official (text) code: wxsh1213/prokt_text.
See docs/methods.md §5.

A converged teacher is a hard target for a small student. ProKT trains the teacher *with* the
student and makes each teacher update a local target the student can follow (an approximate
mirror-descent step): the teacher is pulled back towards the student while it learns the task.
The teacher is the one kdx trains (``TeacherUse.TRAINED``) and is checkpointed with the run.

Each training step, in the official code's order (manual optimization, two optimizers):

1. student snapshot: ``z_s = student(x)`` in ``eval()``, under ``no_grad`` (skipped when λ = 0);
2. teacher step, teacher in ``train()``, T = 1, its own optimizer, scheduler and clipping::

       L_T = (1-λ)·CE(z_t, y) + λ·KL(softmax(z_s) ‖ softmax(z_t))        (z_s detached)

3. teacher snapshot: ``z_t' = teacher(x)`` under ``no_grad``, in ``eval()`` (``teacher_snapshot=eval``,
   the official order) or in ``train()`` (``teacher_snapshot=train``: BatchNorm normalises with the
   batch's statistics; its running statistics are restored afterwards, so the snapshot changes
   nothing in the teacher);
4. student step, student in ``train()``, with its own clipping::

       L_S = (1-α)·CE(z_s, y) + α·T²·KL(softmax(z_t'/T) ‖ softmax(z_s/T))

The teacher's optimizer and scheduler come from ``conf/optim/`` like the student's:
``conf/method/prokt.yaml`` puts an ``optim`` recipe at ``method.teacher_optim`` (``defaults:
[/optim@teacher_optim: adam]``; ``method/teacher_optim=sgd`` on the command line picks another), so
``teacher_optim`` arrives as ``{optimizer: partial, scheduler: partial | None, interval}``. Its
horizon (``T_max``, ``total_steps``) is filled by the module from the run's length, as for the
student. Built directly (tests), ``teacher_optim=None`` means Adam at lr 0.01 without a scheduler.

Schedulers: Lightning does not step them under manual optimization, so this method does:
``interval: step`` ones after every training step, ``interval: epoch`` ones in
``on_train_epoch_end``. Both optimizers use Lightning's optimizer wrappers, so
``trainer.global_step`` counts 2 steps per batch.

Teacher start: ``teacher_init=random`` (default) builds the teacher from random initialisation and
loads nothing; ``teacher_init=checkpoint`` loads ``teacher.ckpt`` (lower ``teacher.min_acc`` for an
early checkpoint). Start ProKT from random init or an EARLY checkpoint, never from a converged
teacher: following the teacher's training path is the method; a converged teacher (which is what
``teacher.ckpt=auto`` trains) defeats it. ``zero_init_heads`` zeroes both classifier heads at the
start (the official ``--init_classifier_to_zero``), so both predict the uniform distribution at
step 0.

Defaults: λ (``move_back_weight``) = 0.4 (official BERT-base → BERT-6 setting); student loss
α = 0.9, T = 4 (the RepDistiller KD convention, docs/methods.md §5); teacher: ``optim=adam``
(kdx's MNIST-1D recipe, so teacher and student train alike there); gradient-norm clipping at 1.0
for both (HF ``max_grad_norm`` in the official code); eval-mode teacher snapshot. For CIFAR-100
give the teacher the student's SGD recipe: ``method/teacher_optim=sgd``. The official text setting
is ``method.alpha=1.0 method.temperature=1.0 method.zero_init_heads=true`` with AdamW and a linear
decay.

Deviations from the paper: the image-classification recipe of the paper could not be read (only
the text code was found), so the student's CE + T = 4 loss, the teacher's optimizer/lr/schedule,
random teacher init and clipping the student at 1.0 are our choices; the optional dual
(Lagrangian) variant of the official code is not implemented (its code path is broken). The
official text models have no BatchNorm, so which mode the snapshot of a BatchNorm teacher should use
is open: eval mode (default, the official order) reads running statistics that lag behind a teacher
trained from scratch for the first few dozen steps; ``teacher_snapshot=train`` avoids that.
Under DDP the teacher is wrapped for gradient reduction too (the one method that does so), and the
two backward passes per step need ``trainer.strategy=ddp_find_unused_parameters_true`` (checked at
fit start); replicas were checked to stay in sync with ``trainer=ddp_sim``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.errors import KDXError
from kdx.losses import check_kd_weights, kd_loss, soft_cross_entropy
from kdx.methods.base import (
    DistillationMethod,
    SoftTarget,
    TeacherUse,
    Terms,
    hinton_target,
    register_method,
    train_mode,
)

log = logging.getLogger(__name__)

TEACHER_INITS = ("random", "checkpoint")
SNAPSHOT_MODES = ("eval", "train")


def teacher_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(softmax(z_s) ‖ softmax(z_t))`` at T = 1, batchmean; the student side is detached, so the
    gradient reaches only the teacher logits (ProKT's "move back" term)."""
    return soft_cross_entropy(teacher_logits, F.softmax(student_logits.detach(), dim=-1), 1.0)


@contextlib.contextmanager
def running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Every buffer of ``model`` (BatchNorm running statistics and counters) restored on exit, so a
    train-mode forward inside the block leaves the model as it was."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@register_method("prokt")
class ProKT(DistillationMethod):
    teacher_use = TeacherUse.TRAINED
    manual_optimization = True
    live_reason = "it trains the teacher, whose outputs change every step"

    def __init__(
        self,
        move_back_weight: float = 0.4,
        alpha: float = 0.9,
        temperature: float = 4.0,
        teacher_init: str = "random",
        teacher_snapshot: str = "eval",
        zero_init_heads: bool = False,
        teacher_optim: Any = None,
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
        if teacher_snapshot not in SNAPSHOT_MODES:
            raise ValueError(
                f"method.teacher_snapshot={teacher_snapshot!r} must be one of {', '.join(SNAPSHOT_MODES)}"
            )
        if teacher_optim is not None and not callable(teacher_optim.get("optimizer")):
            raise ValueError(
                "method.teacher_optim must be an optim recipe ({optimizer: ..., scheduler: ..., interval}), "
                "e.g. method/teacher_optim=adam"
            )
        self.move_back_weight = move_back_weight
        self.alpha = alpha
        self.temperature = temperature
        self.teacher_init = teacher_init
        self.zero_init_heads = zero_init_heads
        self.teacher_snapshot_mode = teacher_snapshot
        self.teacher_optim = teacher_optim
        self.teacher_max_grad_norm = teacher_max_grad_norm
        self.student_max_grad_norm = student_max_grad_norm

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

    def soft_target(self) -> SoftTarget:
        """The student's KD target, ``softmax(z_t'/T)`` (the diagnostics read the teacher in eval mode)."""
        return SoftTarget(self.temperature, hinton_target(self.temperature))

    def teacher_optimizers(self, teacher: nn.Module, build_scheduler: Callable[..., Any]) -> list[dict]:
        params = [p for p in teacher.parameters() if p.requires_grad]
        recipe = self.teacher_optim
        if recipe is None:
            return [{"optimizer": torch.optim.Adam(params, lr=0.01)}]
        opt = recipe["optimizer"](params)
        config: dict[str, Any] = {"optimizer": opt}
        if recipe.get("scheduler") is not None:
            interval = recipe.get("interval", "epoch")
            config["lr_scheduler"] = {
                "scheduler": build_scheduler(recipe["scheduler"], opt, interval),
                "interval": interval,
                "name": "lr-teacher",
            }
        return [config]

    def on_fit_start(self, ctx: StepContext) -> None:
        for config in ctx.lr_scheduler_configs:
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
        if ctx.world_size > 1 and ctx.ddp_find_unused_parameters is False:
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
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], ctx: StepContext) -> Terms:
        x, y, _ = batch
        student_opt, teacher_opt = self._optimizers(ctx)
        student_logits = self.student_snapshot(ctx, x) if self.move_back_weight > 0 else None
        teacher_terms = self.teacher_step(ctx, x, y, student_logits, teacher_opt)
        teacher_logits = self.teacher_snapshot(ctx, x)
        terms = self.student_step(ctx, x, y, teacher_logits, student_opt)
        self.step_schedulers(ctx, "step")
        return {**terms, **{f"teacher/{k}": v for k, v in teacher_terms.items()}}

    def student_snapshot(self, ctx: StepContext, x: Tensor) -> Tensor:
        with torch.no_grad(), train_mode(ctx.student, False):
            return ctx.student(x, self.reads).logits.detach()

    def teacher_snapshot(self, ctx: StepContext, x: Tensor) -> Tensor:
        training = self.teacher_snapshot_mode == "train"
        with torch.no_grad(), train_mode(ctx.teacher, training), running_statistics_kept(ctx.teacher):
            return ctx.teacher(x, self.reads).logits.detach()

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
        self, ctx: StepContext, x: Tensor, y: Tensor, student_logits: Tensor | None, optimizer: Any
    ) -> Terms:
        """One update of the teacher towards the labels and back towards the student snapshot."""
        with train_mode(ctx.teacher, True):
            terms = self.teacher_loss(ctx.teacher(x, self.reads).logits, y, student_logits)
            self._update(ctx, optimizer, terms["loss"], self.teacher_max_grad_norm)
        return {k: v.detach() for k, v in terms.items()}

    def student_step(
        self, ctx: StepContext, x: Tensor, y: Tensor, teacher_logits: Tensor, optimizer: Any
    ) -> Terms:
        """One KD update of the student towards the updated teacher's snapshot."""
        with train_mode(ctx.student, True):
            terms = self.student_loss(ctx.student(x, self.reads).logits, y, teacher_logits)
            self._update(ctx, optimizer, terms["loss"], self.student_max_grad_norm)
        return {k: v.detach() for k, v in terms.items()}

    @staticmethod
    def _update(ctx: StepContext, optimizer: Any, loss: Tensor, max_grad_norm: float) -> None:
        optimizer.zero_grad()
        ctx.manual_backward(loss)
        if max_grad_norm and max_grad_norm > 0:
            ctx.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()

    @staticmethod
    def _optimizers(ctx: StepContext) -> tuple[Any, Any]:
        optimizers = ctx.optimizers()
        if not isinstance(optimizers, (list, tuple)) or len(optimizers) != 2:
            raise RuntimeError(
                "method=prokt needs two optimizers (student, teacher); the module gave "
                f"{1 if not isinstance(optimizers, (list, tuple)) else len(optimizers)}"
            )
        return optimizers[0], optimizers[1]

    # -- schedulers ---------------------------------------------------------------------------
    def on_train_epoch_end(self, ctx: StepContext) -> None:
        self.step_schedulers(ctx, "epoch")

    @staticmethod
    def step_schedulers(ctx: StepContext, interval: str) -> None:
        """Step the schedulers of the given interval (manual optimization: Lightning does not)."""
        for config in ctx.lr_scheduler_configs:
            if config.interval == interval:
                config.scheduler.step()
