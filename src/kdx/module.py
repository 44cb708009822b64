"""DistillationModule: holds student, teacher, method and metrics; knows no method by name.

``training_step`` hands the batch to ``method.training_step`` and adds the named loss terms it
returns to device-side sums: ``train/<term>_epoch`` (their epoch means) is logged once an epoch and
``train/loss_step`` on the steps the loggers write, so a step neither calls Lightning's costly
``self.log`` nor waits for the device; the NaN check reads the same sums every
``nonfinite_check_every`` steps (docs/performance.md). Validation and test measure the student, the
teacher and the distance between them (:mod:`kdx.metrics`). The teacher stays in ``eval()`` with
gradients off and out of every optimizer unless the method's ``teacher_use`` is ``TRAINED``. The
method sees the run only through the :class:`~kdx.context.StepContext` the module builds for each
step and hook.

Speed switches: ``teacher_cache`` (:mod:`kdx.teacher_outputs`: training batches read the teacher's
stored outputs, moved with the batch), ``channels_last`` and ``compile`` (in place).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kdx.context import StepContext, context_of
from kdx.errors import KDXError, NonFiniteLossError, NonFiniteSources
from kdx.methods.base import DistillationMethod
from kdx.metrics import FidelityMetrics, LanguageModelMetrics
from kdx.models.adapter import as_feature_model
from kdx.models.base import EMBEDDING, LOGITS, ModelOutput
from kdx.teacher_outputs import TeacherOutputCache

log = logging.getLogger(__name__)

# The module overrides the batch-transfer hooks on purpose (cached teacher rows, channels_last):
# Lightning's notice that a data module's own hooks are then not used says nothing about a kdx run.
warnings.filterwarnings("ignore", message=r"You have overridden `on_(before|after)_batch_transfer`")

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
        teacher_cache: TeacherOutputCache | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
    ):
        super().__init__()
        self.nonfinite_check_every = max(1, int(nonfinite_check_every))
        # this epoch's loss terms: names -> [batch-size-weighted sums (device), examples (host)]
        self._term_sums: dict[tuple[str, ...], list] = {}
        self.student = as_feature_model(student, student_stages)
        self.teacher = None if teacher is None else as_feature_model(teacher, teacher_stages)
        self.method = method
        self.num_classes = num_classes
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._scheduler_interval = scheduler_interval
        self.automatic_optimization = not method.manual_optimization
        use = method.teacher_use
        if use.needs_teacher and self.teacher is None:
            raise ValueError(
                f"method '{method.name}' needs a teacher, but teacher=none; "
                "pick a teacher (e.g. teacher=cnn1d) or method=none"
            )
        if self.teacher is not None:
            self.teacher.requires_grad_(use.trains_teacher)
            self.teacher.train(use.trains_teacher)
        has_teacher = self.teacher is not None
        # names a NaN's source (kdx.errors.NonFiniteSources.message): the sums of the training inputs
        # and of the teacher's logits ride along with the loss sums, so naming it costs no extra sync
        self._teacher_sum: Tensor | None = None
        self._step_loss: Tensor | None = None
        self._zero: Tensor | None = None
        if self.teacher is not None:
            self.teacher.register_forward_hook(self._watch_teacher)
        self.teacher_cache = teacher_cache if teacher_cache is not None and teacher_cache.active else None
        if self.teacher_cache is not None and not use.needs_teacher:
            log.info("teacher.cache: method %s reads no teacher outputs; nothing to cache", method.name)
            self.teacher_cache = None
        if self.teacher_cache is not None and self.teacher_cache.mode == "auto":
            if not has_teacher or not use.cacheable:  # auto: off where it cannot be on
                log.info("teacher.cache=auto: off for method %s (needs the live teacher)", method.name)
                self.teacher_cache = None
        if self.teacher_cache is not None:
            if not has_teacher:
                raise KDXError("teacher.cache is set but the run has no teacher; set teacher.cache=off")
            if not use.cacheable:
                raise KDXError(
                    f"method={method.name} cannot train from cached teacher outputs: {method.live_reason}; "
                    "set teacher.cache=off for this method"
                )
            sparse_problem = method.sparse_target_problem()
            if self.teacher_cache.mode == "topk" and sparse_problem is not None:
                raise KDXError(
                    f"method={method.name} cannot train from the top-k teacher cache: {sparse_problem}; "
                    "set teacher.cache=off (or exact) for this method"
                )
        # the fields of a training step's StepContext that stay fixed over an epoch (_training_context)
        self._context_fields: dict[str, Any] | None = None
        self._cached_for: Any = None  # the training input whose teacher outputs came from the cache
        self._cached_out: ModelOutput | None = None
        self._cached_rows: dict[str, Tensor] | None = None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        if compile:
            # in place (nn.Module.compile): parameter names, checkpoints and resume are unchanged;
            # `compile` is True (torch's default backend, inductor) or a backend's name
            options = {} if compile is True else {"backend": str(compile)}
            self.student.compile(**options)
            if self.teacher is not None and not use.trains_teacher:
                self.teacher.compile(**options)
        # a causal LM (per-position logits) is measured by perplexity, token KL and agreement
        language_model = getattr(student, "input_kind", None) == "lm"
        if language_model != method.token_level and method.teacher_use.needs_teacher:
            raise KDXError(
                f"method={method.name} is {'a token-level' if method.token_level else 'a classification'} "
                f"method, and the student is {'a causal language model' if language_model else 'a classifier'}; "
                "pick a method made for this model (token-level: fkl, rkl, jsd, skl, srkl, tvd, gkd, seqkd)"
            )
        metrics = LanguageModelMetrics if language_model else FidelityMetrics
        self.val_metrics = metrics(num_classes, has_teacher)
        self.test_metrics = metrics(num_classes, has_teacher)

    # -- modes --------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None and not self.method.teacher_use.trains_teacher:
            self.teacher.eval()  # BN statistics and dropout of a fixed teacher never change
        return self

    def setup(self, stage: str) -> None:
        # the task's own scores (GLUE: MCC for CoLA, F1 for MRPC/QQP), declared by the data module
        scores = tuple(getattr(self.trainer.datamodule, "scores", None) or ())
        self.val_metrics.use_scores(scores)
        self.test_metrics.use_scores(scores)
        if stage == "fit":
            if self.teacher_cache is not None:
                if self.trainer.datamodule is None:
                    raise KDXError("teacher.cache reads the training set from a data module; fit with one")
                self.teacher_cache.bind(self.trainer.datamodule)
                if not self.teacher_cache.active:  # auto found nothing it can cache
                    self.teacher_cache = None
            self.method.setup(self.student, self.teacher, self.trainer.datamodule)

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Any, Tensor, Tensor], batch_idx: int) -> Tensor | None:
        terms = self.method.training_step(batch, self._training_context())
        loss = terms["loss"]
        self._accumulate(terms, batch[0], batch[1].shape[0])  # y is always a tensor; x may be a mapping
        # logged in on_train_batch_end, on the steps the loggers write (every log_every_n_steps)
        self._step_loss = loss.detach() if self._logs_this_step() else None
        return loss if self.automatic_optimization else None

    def step_context(self) -> StepContext:
        """What the method may use now (:mod:`kdx.context`), read from the trainer this module runs in."""
        strategy = self.trainer.strategy
        # Lightning keeps DDP's constructor options private; ProKT needs one of them, as a plain bool
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        return context_of(
            self,
            self.student,
            self.teacher,
            ddp_find_unused_parameters=(
                None if ddp_kwargs is None else bool(ddp_kwargs.get("find_unused_parameters", False))
            ),
            cached_teacher=self.cached_teacher,
            optimizers=self.optimizers,
            lr_scheduler_configs=self.trainer.lr_scheduler_configs,
            manual_backward=self.manual_backward,
            clip_gradients=self.clip_gradients,
        )

    def _training_context(self) -> StepContext:
        """:meth:`step_context` for a training step: the fields that stay fixed over an epoch (data,
        loader, rank, device, the loop's callables) are read from the trainer once an epoch."""
        fields = self._context_fields
        if fields is None:
            ctx = self.step_context()
            fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
            del fields["epoch"], fields["step"]
            self._context_fields = fields
        return StepContext(epoch=self.current_epoch, step=self.global_step, **fields)

    def _watch_teacher(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", output)
        if self.training and isinstance(logits, Tensor) and logits.is_floating_point():
            total = logits.detach().sum()
            self._teacher_sum = total if self._teacher_sum is None else self._teacher_sum + total

    def _accumulate(self, terms: dict[str, Tensor], x: Any, batch_size: int) -> None:
        """Add the batch-size-weighted terms to this epoch's device-side sums (one stacked add, no sync).

        The sums carry the NaN check as well: a non-finite loss anywhere in the epoch makes the
        loss sum non-finite, which :meth:`_check_finite` reads every ``nonfinite_check_every`` steps.
        Two more entries after the terms, the sums of the inputs and of the teacher's logits, say
        where a NaN came from (a sum of finite values of sane data is finite).
        """
        names = tuple(terms)
        values = list(terms.values())
        if any(v.dtype != torch.float32 or v.dim() for v in values):  # bf16 terms under autocast
            values = [v.float().reshape(()) for v in values]
        zero = self._zero
        if zero is None or zero.device != values[0].device:
            zero = self._zero = values[0].new_zeros(())
        inputs = x.detach().sum() if isinstance(x, Tensor) and x.is_floating_point() else zero
        teacher = zero if self._teacher_sum is None else self._teacher_sum
        self._teacher_sum = None
        values += [v if v.dtype == torch.float32 else v.float() for v in (inputs, teacher)]
        held = self._term_sums.get(names)
        with torch.no_grad():
            stacked = torch.stack(values)
            if held is None:
                self._term_sums[names] = [stacked * batch_size, batch_size]
            else:
                held[0].add_(stacked, alpha=batch_size)
                held[1] += batch_size

    def _logs_this_step(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        # Lightning's own rule for "the loggers write this step" (log_every_n_steps, fast_dev_run)
        connector = getattr(trainer, "_logger_connector", None)
        return bool(trainer.fast_dev_run) or bool(getattr(connector, "should_update_logs", True))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_loss is not None:
            # `train/loss_step` for the loggers and the progress bar, every `trainer.log_every_n_steps`
            # steps only: Lightning's `self.log` costs ~1 ms of host time a call. The value goes to
            # the host here (the one sync of a log step): Lightning converts progress-bar values with
            # `.item()` after *every* batch, which would sync a GPU each step on a device tensor.
            self.log("train/loss_step", self._step_loss.cpu(), on_step=True, on_epoch=False, prog_bar=True)
            self._step_loss = None
        if (batch_idx + 1) % self.nonfinite_check_every == 0:
            self._check_finite()

    def _check_finite(self) -> None:
        """Stop on a non-finite loss seen by any rank this epoch; every rank decides alike."""
        if not self._term_sums:
            return
        # (loss, inputs, teacher outputs) sums of every name set: non-finite on any rank? The one host
        # sync per check, after one small reduce over the ranks
        watched = torch.stack(
            [
                values[[names.index("loss"), len(names), len(names) + 1]]
                for names, (values, _) in self._term_sums.items()
            ]
        )
        bad = (~torch.isfinite(watched)).any(0).float()
        reduced = self.trainer.strategy.reduce(bad, reduce_op="max")
        sources = [name for name, seen in zip(NonFiniteSources.NAMES, reduced.tolist()) if seen > 0]
        if sources:
            raise NonFiniteLossError(NonFiniteSources.message(sources, self.current_epoch, self.global_step))

    def _log_epoch_terms(self) -> None:
        """``train/<term>_epoch``: the batch-size-weighted mean of each term over the epoch."""
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for names, (values, count) in self._term_sums.items():  # a term may appear in several name sets
            for name, value in zip(names, values.unbind()):
                sums[name] = value if name not in sums else sums[name] + value
                counts[name] = counts.get(name, 0) + count
        self._term_sums = {}
        means = {f"train/{name}_epoch": total / counts[name] for name, total in sums.items()}
        if means:
            loss = means.pop("train/loss_epoch", None)
            if loss is not None:
                self.log(
                    "train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True
                )
            self.log_dict(means, on_step=False, on_epoch=True, sync_dist=True)

    def on_fit_start(self) -> None:
        if self.teacher_cache is not None:  # after the strategy moved the teacher to its device
            self.teacher_cache.prepare(
                self.teacher, self.method.reads, forward_context=self.trainer.precision_plugin.forward_context
            )
        self.method.on_fit_start(self.step_context())

    # -- batches: cached teacher outputs and memory format, without a device sync ------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self._cached_rows = None
        if self.teacher_cache is not None and self._trainer is not None and self.trainer.training:
            # the index is still on the host here: reading the rows needs no device sync
            self._cached_rows = self.teacher_cache.read(batch[2], self.current_epoch)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.channels_last and isinstance(batch[0], Tensor) and batch[0].dim() == 4:
            batch = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        if self._cached_rows is not None:
            parts = {k: v.to(self.device, non_blocking=True) for k, v in self._cached_rows.items()}
            self._cached_out, self._cached_for = self.teacher_cache.output(parts), batch[0]
            self._cached_rows = None
        else:
            self._cached_out = self._cached_for = None
        return batch

    def cached_teacher(self, x: Any) -> ModelOutput | None:
        """The teacher's outputs for this training batch's input ``x`` from the cache, or None."""
        return self._cached_out if x is self._cached_for else None

    def on_train_epoch_start(self) -> None:
        self._term_sums = {}
        self._context_fields = None  # the loader may be new this epoch (reload_dataloaders_every_n_epochs)
        self.method.on_train_epoch_start(self.step_context())

    def on_train_epoch_end(self) -> None:
        self._check_finite()
        self._log_epoch_terms()
        self.method.on_train_epoch_end(self.step_context())

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a frozen teacher is provided again by teacher.ckpt at load time: don't copy it into every file
        if self.teacher is not None and not self.method.teacher_use.trains_teacher:
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
        self.method.on_validation_epoch_end(self.step_context())

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
        if self.method.teacher_use.trains_teacher and self.teacher is not None:
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
