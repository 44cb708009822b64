"""Build: the one builder of a run's components, and the factories it builds them with.

:func:`build` turns a composed, validated config into :class:`Components`: the data module, the
method, the teacher (given its weights, trained by the pipeline's ``run`` when ``teacher.ckpt=auto``
is not cached yet, and checked), the student, the :class:`~kdx.module.DistillationModule` and a way
to make the run's ``lightning.Trainer``. ``kdx-train`` (the student run and the auto-teacher run
alike), ``kdx-eval``, ``kdx-bench`` and the teacher check all build through this module, so model,
optimizer, scheduler and teacher-output-cache wiring exists once.

Nothing here reads the data: Lightning's own hooks prepare it (``prepare_data`` once per node, then
``setup``) inside the teacher run, the teacher check and ``fit``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdx.callbacks import ChanceTest
from kdx.data.base import KDDataModule
from kdx.data.text import TRAIN_TOKENIZER, TextDataModule
from kdx.errors import HyperParameterError, KDXError
from kdx.methods.base import METHODS, DistillationMethod
from kdx.models.adapter import as_feature_model
from kdx.models.base import LOGITS
from kdx.models.hf import load_tokenizer
from kdx.module import DistillationModule
from kdx.pipeline.compose import hydra_choices
from kdx.pipeline.switches import compile_switch, resolve_channels_last
from kdx.teacher import RunFn, data_key, portable, provide_teacher
from kdx.teacher_outputs import TeacherOutputCache

log = logging.getLogger("kdx")


@dataclass
class Components:
    """What a run is made of, built and checked for consistency before any training."""

    cfg: DictConfig
    datamodule: L.LightningDataModule
    method: DistillationMethod
    student: nn.Module
    teacher: nn.Module | None
    module: DistillationModule
    teacher_info: dict[str, Any] = field(default_factory=dict)
    """``teacher/*`` figures for metrics.json: name, source, ckpt, sha256, val_acc..."""
    warnings: list[str] = field(default_factory=list)
    """Setups that are legal but likely not what the user meant (logged, and kept in metrics.json)."""

    def make_trainer(self, **overrides: Any) -> L.Trainer:
        """The run's ``lightning.Trainer`` (``cfg.trainer``), with keyword overrides (callbacks, logger...)."""
        return make_trainer(self.cfg.trainer, **overrides)


def build(cfg: DictConfig, *, train_teacher: RunFn | None = None, for_training: bool = True) -> Components:
    """The components of ``cfg``'s run.

    ``train_teacher``: the pipeline's ``run``, which trains an auto-teacher that is not cached yet
    (``None``: such a teacher is an error). ``for_training=False`` (kdx-eval, whose weights come from
    a checkpoint): the teacher is not validated, and no setup warnings are raised.
    """
    resolve_tokenizers(cfg, train=for_training)
    datamodule: L.LightningDataModule = instantiate(cfg.dataset.datamodule)
    if int(datamodule.num_classes) != int(cfg.dataset.num_classes):
        raise KDXError(
            f"dataset={cfg.dataset.name}: the config says num_classes={cfg.dataset.num_classes} "
            f"but the data has {datamodule.num_classes}; fix dataset.num_classes"
        )
    method = instantiate_method(cfg.method)
    student = instantiate(cfg.student.model)
    student_classes = getattr(student, "num_classes", None)
    if student_classes is not None and int(student_classes) != int(cfg.dataset.num_classes):
        raise KDXError(
            f"student={cfg.student.name} has {student_classes} classes but dataset={cfg.dataset.name} "
            f"has {cfg.dataset.num_classes}; leave student.model.num_classes at ${{dataset.num_classes}}"
        )
    input_shape = cfg.dataset.get("input_shape")
    _check_reads_input(student, input_shape, "student", cfg)
    use = method.teacher_use
    info: dict[str, Any] = {}
    teacher = None
    teacher_chance: ChanceTest | None = None
    if use.needs_teacher or cfg.teacher.get("model") is not None:
        if use.needs_teacher and cfg.teacher.get("model") is None:
            raise KDXError(
                f"method={method.name} needs a teacher but teacher=none; pick one, e.g. teacher=cnn1d"
            )
        _check_reads_input(instantiate(cfg.teacher.model), input_shape, "teacher", cfg)
        if use.trains_teacher and not method.uses_teacher_weights():
            pretrained = cfg.teacher.model.get("name_or_path")  # e.g. a Hugging Face checkpoint folder
            source = f"pre-trained weights of {pretrained}" if pretrained else "random init"
            teacher, info = instantiate(cfg.teacher.model), {"teacher/source": source}
        else:
            teacher, info = provide_teacher(cfg, train_teacher)
            if for_training:
                checked = check_teacher(cfg, teacher)
                if checked is not None:
                    info["teacher/val_acc"], teacher_chance = checked
    warnings: list[str] = []
    if for_training:
        L.seed_everything(
            cfg.seed, workers=True, verbose=False
        )  # the same student init whatever the teacher did
        student = instantiate(cfg.student.model)
        warnings = [
            *method.run_warnings(cfg.trainer.get("max_epochs")),
            *_setup_warnings(cfg, student, teacher, info, teacher_chance),
        ]
        for warning in warnings:
            log.warning("kdx: warning: %s", warning)
    module = make_module(cfg, student, method, teacher)
    return Components(cfg, datamodule, method, student, teacher, module, info, warnings)


def resolve_tokenizers(cfg: DictConfig, *, train: bool = True) -> None:
    """Complete ``cfg`` in place with the tokenizer a data set trains (GLUE,
    :meth:`kdx.data.glue.GLUEDataModule.trained_tokenizer`): ``model.tokenizer=train`` becomes the
    trained tokenizer's folder, shared by every model that names it; a model built from a config
    (no checkpoint) that names no tokenizer gets it by default; and a config-built model whose
    ``vocab_size`` is unset takes the tokenizer's size (a larger one wastes embedding rows, a
    smaller one is refused by :func:`kdx.models.hf.hf_model`). The run's record then names the
    folder and the size. ``train=False`` (kdx-eval): a tokenizer that is not cached is an error,
    never trained."""
    node = cfg.dataset.get("datamodule")
    target = node.get("_target_") if node is not None else None
    trains = False
    if target:
        try:
            cls = get_class(str(target))
            trains = isinstance(cls, type) and issubclass(cls, TextDataModule) and cls.trains_tokenizer
        except Exception:  # noqa: BLE001 - an unknown target is reported where it is instantiated
            trains = False
    roles = []
    for role in ("student", "teacher"):
        model = cfg.get(role, {}).get("model") if cfg.get(role) is not None else None
        if model is None or "tokenizer" not in model:
            continue
        built = model.get("name_or_path") is None and model.get("config") is not None
        tokenizer = model.get("tokenizer")
        if tokenizer is None and built and trains:
            tokenizer = TRAIN_TOKENIZER
        if tokenizer == TRAIN_TOKENIZER:
            if not trains:
                raise KDXError(
                    f"{role}.model.tokenizer={TRAIN_TOKENIZER}: dataset={cfg.dataset.get('name')} does not "
                    "train a tokenizer (dataset=glue does); give the model a tokenizer folder"
                )
            roles.append((role, built))
    if not roles:
        return
    with open_dict(cfg):
        for role, _ in roles:
            cfg[role].model.tokenizer = TRAIN_TOKENIZER
    datamodule = instantiate(cfg.dataset.datamodule)
    # absolute, so every key that names it is written the same way (kdx.teacher.key.portable)
    folder = Path(datamodule.trained_tokenizer(create=train)).resolve()
    size = len(load_tokenizer(str(folder)))
    with open_dict(cfg):
        for role, built in roles:
            cfg[role].model.tokenizer = str(folder)
            if built and cfg[role].model.get("vocab_size") is None:
                cfg[role].model.vocab_size = size
    log.info("Tokenizer of %s: %s (%d tokens)", " and ".join(r for r, _ in roles), folder, size)


def root_cause(err: BaseException) -> BaseException:
    """The error behind Hydra's instantiation wrappers."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def instantiate_method(node: DictConfig) -> DistillationMethod:
    """The method; a ``ValueError`` from its constructor is a hyper-parameter out of range (a user
    error: one line, exit 2), anything else raised there stays a bug (traceback, exit 1)."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = root_cause(err)
        if isinstance(cause, ValueError) and not isinstance(cause, KDXError):
            raise HyperParameterError(str(cause)) from err
        raise


def _check_reads_input(model: nn.Module, input_shape: Any, role: str, cfg: DictConfig) -> None:
    """Fail now, with the fix, when a model cannot read the data set's inputs (an image model on 1-D data)."""
    if input_shape is None:
        return
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape))
    except Exception as err:  # noqa: BLE001 - whatever the model raises, the fix is the same
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KDXError(
            f"{role}={cfg[role].name} cannot read dataset={cfg.dataset.name}'s inputs of shape {tuple(input_shape)} "
            f"({type(err).__name__}: {reason}); pick a {role} made for this data (e.g. mlp / cnn1d for 1-D "
            "signals, a CIFAR zoo model or timm for images) or a data set it can read"
        ) from None
    finally:
        model.train(was_training)


def _setup_warnings(
    cfg: DictConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    info: dict,
    teacher_chance: ChanceTest | None = None,
) -> list[str]:
    """Runs that are legal but likely not what the user meant. ``teacher_chance``: the test of the
    validation split the teacher was checked on (the student's criterion, :class:`ChanceTest`)."""
    found = []
    acc = info.get("teacher/val_acc")
    if acc is not None and teacher_chance is not None and teacher_chance.at_chance(acc):
        found.append(
            f"teacher={cfg.teacher.name} validates at {teacher_chance.describe(acc)}: distilling from it "
            "teaches nothing; train it longer or pass a better teacher.ckpt"
        )
    if teacher is not None:
        sizes = [sum(p.numel() for p in m.parameters()) for m in (student, teacher)]
        if sizes[0] > sizes[1]:
            found.append(
                f"student={cfg.student.name} ({sizes[0]:,} parameters) is larger than teacher="
                f"{cfg.teacher.name} ({sizes[1]:,}); is teacher=/student= the right way round?"
            )
    choices = hydra_choices() or {}
    if str(cfg.dataset.name).startswith(("cifar", "imagenet")) and not choices.get("experiment"):
        found.append(
            f"dataset={cfg.dataset.name} with the default recipe (optim={choices.get('optim', '?')}, "
            f"{cfg.trainer.get('max_epochs')} epochs) made for MNIST-1D; for published numbers use an "
            "experiment= recipe, e.g. experiment=crd_cifar100/resnet32x4_resnet8x4"
        )
    return found


# ---------------------------------------------------------------------------------------------
# The teacher check


def check_teacher(cfg: DictConfig, model: nn.Module) -> tuple[float, ChanceTest | None] | None:
    """Validation accuracy of the teacher (``trainer.validate`` on the run's accelerator, one device)
    and the chance test of that split (at the student's level, ``callbacks.divergence.chance_alpha``;
    None for a data module outside the data protocol); stops the run below ``teacher.min_acc``.
    Ranks other than 0 trust rank 0's check."""
    if rank_zero_only.rank != 0:
        return None
    name, num_classes = cfg.teacher.name, int(cfg.dataset.num_classes)
    input_shape = cfg.dataset.get("input_shape")
    if input_shape is not None:
        logits = as_feature_model(model).probe(tuple(input_shape), (LOGITS,)).logits
        if logits.shape[-1] != num_classes:
            raise KDXError(
                f"teacher={name} outputs {logits.shape[-1]} classes but the data set has {num_classes}; "
                "set the teacher's num_classes to the data set's"
            )
    # the teacher alone, as a student of method none: the run's own speed switches, stages and
    # optimizer do not apply to a validation pass
    module = make_module(
        OmegaConf.create({"dataset": {"num_classes": num_classes}, "student": {"stage_names": None}}),
        model,
        METHODS["none"](),
    )
    trainer = make_trainer(
        OmegaConf.create({"_target_": "lightning.Trainer"}),
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        num_nodes=1,
        strategy="auto",
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    was_training = model.training
    datamodule = instantiate(cfg.dataset.datamodule)
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    model.train(was_training).cpu()
    alpha = float(OmegaConf.select(cfg, "callbacks.divergence.chance_alpha", default=None) or 0.001)
    chance = ChanceTest.of(datamodule.val_targets(), alpha) if isinstance(datamodule, KDDataModule) else None
    acc = float(results[0]["val/student/acc"])
    if acc < float(cfg.teacher.min_acc):
        raise KDXError(
            f"teacher={name} has validation accuracy {acc:.4f} < teacher.min_acc={cfg.teacher.min_acc}; "
            "train it longer (teacher.train.epochs), pass a better teacher.ckpt, or lower teacher.min_acc"
        )
    log.info("Teacher %s: validation accuracy %.2f %%", name, 100 * acc)
    return acc, chance


# ---------------------------------------------------------------------------------------------
# Factories


def make_module(
    cfg: DictConfig,
    student: nn.Module,
    method: DistillationMethod,
    teacher: nn.Module | None = None,
    optim: DictConfig | None = None,
) -> DistillationModule:
    """The LightningModule of ``cfg``: ``cfg.optim`` (or ``optim``) wires optimizer and scheduler;
    ``teacher.cache`` the teacher-output cache, ``channels_last`` / ``compile`` (top-level switches)
    the student's (and a frozen teacher's) memory format and ``torch.compile``."""
    optim = cfg.get("optim") if optim is None else optim
    has_optim = optim is not None and optim.get("optimizer") is not None
    channels_last = resolve_channels_last(cfg, student, teacher)
    return DistillationModule(
        student=student,
        method=method,
        num_classes=int(cfg.dataset.num_classes),
        optimizer=instantiate(optim.optimizer) if has_optim else _no_optimizer,
        scheduler=instantiate(optim.scheduler) if has_optim and optim.get("scheduler") else None,
        scheduler_interval=optim.get("interval", "epoch") if has_optim else "epoch",
        teacher=teacher,
        student_stages=cfg.student.get("stage_names"),
        teacher_stages=cfg.teacher.get("stage_names") if cfg.get("teacher") else None,
        nonfinite_check_every=int(cfg.trainer.get("log_every_n_steps") or 10) if cfg.get("trainer") else 10,
        teacher_cache=teacher_output_cache(cfg, channels_last) if teacher is not None else None,
        channels_last=channels_last,
        compile=compile_switch(cfg.get("compile", False)),
    )


def _no_optimizer(params: Any) -> None:
    """Evaluation-only modules (kdx-eval, the teacher check) have nothing to optimise."""
    return None


def make_trainer(trainer_cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """``instantiate(trainer_cfg)`` with keyword overrides (callbacks, logger, devices...)."""
    return instantiate(trainer_cfg, **overrides)


def cache_mode(cfg: DictConfig) -> str:
    """``teacher.cache`` as a string (YAML reads a bare ``off`` as false)."""
    mode = cfg.teacher.get("cache", "off") if cfg.get("teacher") else "off"
    return "off" if mode in (None, False) else str(mode)


def teacher_output_cache_key(cfg: DictConfig, channels_last: bool) -> dict[str, Any]:
    """Everything that decides the stored teacher outputs apart from the weights and the training
    transform (the cache adds those when it is filled); the data named as the auto-teacher's key
    names it (:data:`kdx.teacher.DATA_KEY_EXCLUDED`)."""
    trainer = cfg.get("trainer") or {}
    return {
        "teacher": str(cfg.teacher.get("name")),
        "teacher_model": portable(
            OmegaConf.to_container(cfg.teacher.model, resolve=True), OmegaConf.select(cfg, "paths.cache_dir")
        ),
        "dataset": data_key(cfg),
        "precision": str(trainer.get("precision", "32-true")),
        "channels_last": channels_last,
    }


def teacher_output_cache(cfg: DictConfig, channels_last: bool = False) -> TeacherOutputCache | None:
    """The run's teacher-output cache (``teacher.cache``; ``None`` when off); ``channels_last``: the
    models' memory format as :func:`make_module` resolved it."""
    mode = cache_mode(cfg)
    if mode == "off":
        return None
    return TeacherOutputCache(
        mode,
        cfg.paths.cache_dir,
        teacher_output_cache_key(cfg, channels_last),
        seed=int(cfg.get("seed", 0)),
        views=int(cfg.teacher.get("cache_views", 4)),
        topk=cfg.teacher.get("cache_topk"),
        batch_size=int(cfg.dataset.get("datamodule", {}).get("eval_batch_size") or 256),
    )
