"""Pretrain: a method's pre-training phase (RepDistiller's ``--init_epochs``), before the main fit.

RepDistiller (``train_student.py`` → ``helper/pretrain.py: init``) pre-trains AB, FT and FSP for
``init_epochs`` epochs with a fresh SGD over its ``init_trainable_list`` (momentum and weight decay
of the run, no learning-rate schedule), the student and the teacher otherwise in eval mode; then it
builds the main optimizer anew and runs the full schedule. kdx does the same as a step of its own:
a Lightning fit of :class:`PretrainModule` (the method's ``init_training_step``, an optimizer of the
run's class and hyper-parameters over ``method.init_modules(student)`` at ``method.init_lr``, no
scheduler, no validation) for ``method.init_epochs`` epochs, then the main fit with its own optimizer
(no momentum carried over), its own epoch counter (``trainer.max_epochs`` whole) and the row's
milestones untouched.

Why a step and not a phase inside :class:`~kdx.module.DistillationModule`: a phase inside one fit
would share the main fit's epoch counter (shifting every milestone) and its optimizer (or need two
optimizers, which Lightning allows only under manual optimization); two fits keep both schedules
as the official code has them and leave the module and the method contract unchanged.

Checkpoints: ``checkpoints/init/last.ckpt`` after every pre-training epoch. Resume: a
``ckpt_path`` inside ``checkpoints/init/`` continues the pre-training, then the main fit starts; any
other ``ckpt_path`` is a main-phase checkpoint, written only after the pre-training ended, so the
pre-training is skipped and the main fit resumes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import Tensor, nn

from kdx.context import context_of
from kdx.errors import KDXError, NonFiniteLossError
from kdx.module import DistillationModule

log = logging.getLogger("kdx")

INIT_DIR = "init"  # under the run's checkpoints/ folder

# the phase has no validation on purpose (RepDistiller's init loop validates nothing)
warnings.filterwarnings("ignore", message=r".*`val_dataloader` but have no `validation_step`.*")


class PretrainModule(L.LightningModule):
    """The pre-training phase of ``main``'s method on ``main``'s student and teacher (shared objects:
    what this phase learns is what the main fit starts from)."""

    def __init__(self, main: DistillationModule, optimizer: Any, lr: float):
        super().__init__()
        self.main = main
        self._optimizer, self.lr = optimizer, float(lr)
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    @property
    def trained(self) -> list[nn.Module]:
        return list(self.main.method.init_modules(self.main.student))

    def train(self, mode: bool = True):
        # RepDistiller: model_s.eval(); model_t.eval(); init_modules.train()
        super().train(False)
        for module in self.trained:
            module.train(mode)
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit":
            main = self.main
            main.method.setup(main.student, main.teacher, self.trainer.datamodule)

    def parameters_trained(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for module in self.trained:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def configure_optimizers(self):
        return self._optimizer(self.parameters_trained(), lr=self.lr)

    def training_step(self, batch: tuple[Any, Tensor, Tensor], batch_idx: int) -> Tensor:
        ctx = context_of(self, self.main.student, self.main.teacher)
        terms = self.main.method.init_training_step(batch, ctx)
        n = int(batch[1].shape[0])
        with torch.no_grad():
            for name, value in terms.items():
                held = self._sums.get(name)
                self._sums[name] = value.detach().float() * n if held is None else held + value.detach() * n
        self._count += n
        return terms["loss"]

    def on_train_epoch_start(self) -> None:
        self._sums, self._count = {}, 0

    def on_train_epoch_end(self) -> None:
        means = {name: float(total) / max(1, self._count) for name, total in self._sums.items()}
        if not all(map(_finite, means.values())):
            raise NonFiniteLossError(
                f"pre-training loss is not finite at epoch {self.current_epoch}: {means}; "
                "lower the learning rate (method.init_lr for ft, optim.optimizer.lr otherwise)"
            )
        self.log_dict({f"init/{k}_epoch": v for k, v in means.items()}, on_epoch=True)
        log.info(
            "pre-training epoch %d/%d: %s",
            self.current_epoch + 1,
            self.trainer.max_epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in means.items()),
        )

    # the frozen teacher is provided again by teacher.ckpt when the phase resumes
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.main.teacher is not None and not self.main.method.teacher_use.trains_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("main.teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        teacher = self.main.teacher
        if teacher is not None and not any(k.startswith("main.teacher.") for k in state):
            state.update({f"main.teacher.{k}": v for k, v in teacher.state_dict().items()})


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def init_epochs(method: Any) -> int:
    """The method's pre-training epochs (0: it has no pre-training phase)."""
    if not callable(getattr(method, "init_training_step", None)):
        return 0
    return int(getattr(method, "init_epochs", 0) or 0)


def init_checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints" / INIT_DIR


def resumes_pretraining(cfg: DictConfig) -> bool:
    """``ckpt_path`` is a pre-training checkpoint (inside ``checkpoints/init/``)."""
    ckpt = cfg.get("ckpt_path")
    return bool(ckpt) and Path(str(ckpt)).resolve().parent.name == INIT_DIR


def init_lr(cfg: DictConfig, method: Any) -> float:
    """The pre-training lr: the method's rule applied to the student's name and the run's lr."""
    optim = cfg.get("optim") or {}
    lr = (optim.get("optimizer") or {}).get("lr")
    if lr is None:
        raise KDXError(
            f"method={method.name} pre-trains at the run's learning rate (method.init_epochs > 0), but the "
            "config has no optim.optimizer.lr; set it, or method.init_epochs=0"
        )
    return float(method.init_lr(str(cfg.student.get("name")), float(lr)))


def pretrain(
    cfg: DictConfig, parts: Any, callbacks: Sequence[L.Callback] = (), logger: Any = False
) -> L.Trainer | None:
    """Run the method's pre-training phase (``None`` when it has none, or when ``ckpt_path`` is a
    main-phase checkpoint: the pre-training ended before that checkpoint was written)."""
    epochs = init_epochs(parts.method)
    if epochs == 0:
        return None
    resume = resumes_pretraining(cfg)
    if cfg.get("ckpt_path") and not resume:
        log.info("pre-training: done before %s was written; resuming the main phase", cfg.ckpt_path)
        return None
    lr = init_lr(cfg, parts.method)
    module = PretrainModule(parts.module, instantiate(cfg.optim.optimizer), lr)
    checkpoint = ModelCheckpoint(
        dirpath=init_checkpoint_dir(cfg),
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    trainer = parts.make_trainer(
        callbacks=[checkpoint, *callbacks],
        logger=logger,
        max_epochs=epochs,
        max_steps=-1,
        limit_val_batches=0,
        val_check_interval=1.0,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
    )
    log.info("pre-training %s for %d epochs at lr %g (then the main phase)", parts.method.name, epochs, lr)
    trainer.fit(
        module,
        datamodule=parts.datamodule,
        ckpt_path=str(cfg.ckpt_path) if resume else None,
        weights_only=True,
    )
    if trainer.interrupted:  # a signal stopped it (Lightning returns): the main phase must not start
        raise KDXError(
            f"pre-training was interrupted after {trainer.current_epoch} of {epochs} epochs "
            f"(method.init_epochs); resume it with ckpt_path={init_checkpoint_dir(cfg) / 'last.ckpt'}"
        )
    return trainer
