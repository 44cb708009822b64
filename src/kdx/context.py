"""StepContext: everything a distillation method may use while it trains, built by the module.

:class:`~kdx.module.DistillationModule` builds one for every call into the method
(``training_step`` and the ``on_*`` hooks) from its Lightning state; a method reads nothing else:
no LightningModule, no Trainer, no strategy internals. A test builds one directly,
``StepContext(student=..., teacher=...)``: every other field has a default that means "one process,
no trainer" (epoch 0, rank 0 of 1, CPU, plain ``loss.backward()`` and ``optimizer.step()`` semantics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdx.data.base import KDDataModule
from kdx.models.adapter import FeatureModel
from kdx.models.base import ModelOutput


def _no_cached_outputs(x: Any) -> ModelOutput | None:
    return None


def _backward(loss: Tensor) -> None:
    loss.backward()


def _clip_gradients(
    optimizer: torch.optim.Optimizer,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str | None = None,
) -> None:
    if not gradient_clip_val:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if gradient_clip_algorithm in (None, "norm"):
        nn.utils.clip_grad_norm_(params, gradient_clip_val)
    else:
        nn.utils.clip_grad_value_(params, gradient_clip_val)


def _no_optimizers() -> list[torch.optim.Optimizer]:
    return []


@dataclass
class StepContext:
    """What the module hands a method at each step and hook.

    ``student`` / ``teacher``: the :class:`~kdx.models.adapter.FeatureModel` pair (``teacher`` None
    without one). ``datamodule``: the run's data module (a :class:`~kdx.data.base.KDDataModule`), or
    None. ``train_dataloader``: the loader the trainer draws this epoch's batches from (CRD sizes its
    memory banks by its dataset), or None. ``epoch`` / ``step``: Lightning's current epoch and global
    step; ``rank`` / ``world_size``: this process among the DDP processes. ``ddp_find_unused_parameters``:
    None unless the run is distributed data-parallel, then whether DDP tolerates parameters without a
    gradient in a backward pass (ProKT's two backward passes over disjoint parameter sets need it).

    Manual optimisation (``manual_optimization = True``): ``optimizers()`` returns the optimizers in
    the order the module configured them, ``lr_scheduler_configs`` their schedulers (each with
    ``scheduler``, ``interval``, ``frequency``), ``manual_backward(loss)`` and
    ``clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)`` go through Lightning's
    precision plugin (loss scaling, DDP). ``cached_teacher(x)``: the teacher's stored outputs for this
    batch's input ``x`` when ``teacher.cache`` serves them, else None.
    """

    student: FeatureModel
    teacher: FeatureModel | None = None
    datamodule: KDDataModule | None = None
    train_dataloader: DataLoader | None = None
    epoch: int = 0
    step: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ddp_find_unused_parameters: bool | None = None
    cached_teacher: Callable[[Any], ModelOutput | None] = _no_cached_outputs
    optimizers: Callable[[], Sequence[torch.optim.Optimizer] | torch.optim.Optimizer] = _no_optimizers
    lr_scheduler_configs: Sequence[Any] = ()
    manual_backward: Callable[[Tensor], None] = _backward
    clip_gradients: Callable[..., None] = _clip_gradients


def context_of(module: Any, student: FeatureModel, teacher: FeatureModel | None, **extra: Any) -> StepContext:
    """The context of a LightningModule ``module`` running in its trainer: data, loader, epoch, step,
    rank, world size and device read from Lightning; ``extra`` adds the fields only some loops give
    (cached teacher outputs, manual optimisation)."""
    trainer = module.trainer
    return StepContext(
        student=student,
        teacher=teacher,
        datamodule=trainer.datamodule,
        train_dataloader=trainer.train_dataloader,
        epoch=module.current_epoch,
        step=module.global_step,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        device=module.device,
        **extra,
    )
