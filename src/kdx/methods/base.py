"""The method contract: a distillation method is a strategy object the module hands each batch to.

``DistillationModule.training_step`` knows no method by name. It calls
``method.training_step(batch, ctx)`` and logs the dict of named loss terms it gets back
(``"loss"`` is the one that is optimised, every term a scalar tensor). ``ctx`` is a
:class:`~kdx.context.StepContext`, the only thing a method may use while it trains: the
student and teacher (:class:`~kdx.models.adapter.FeatureModel`), cached teacher outputs, the epoch,
step, rank and device, the data module, and for manual optimization the optimizers, their schedulers,
``manual_backward`` and ``clip_gradients``. A method never imports the module or an entry point.

What a method declares (class attributes):

* ``reads``: which parts of :class:`~kdx.models.base.ModelOutput` it needs from student and
  teacher (``logits``, ``embedding``, ``stages``). The adapters compute nothing else.
* ``teacher_use`` (:class:`TeacherUse`): ``NONE`` trains the student alone; ``FROZEN`` reads a
  frozen teacher's outputs on the batch's input only through :meth:`teacher_forward`, so
  ``teacher.cache=exact|views|topk`` may serve stored outputs (``ctx.cached_teacher``); ``LIVE`` keeps the
  teacher frozen but needs it running (input gradients through it, generated inputs), ``live_reason``
  says why; ``TRAINED`` gives the teacher gradients and an optimizer (ProKT). Unless ``TRAINED`` the
  module keeps the teacher in ``eval()`` with ``requires_grad=False`` and out of every optimizer.
* ``manual_optimization``: the method runs its own optimizer steps inside ``training_step``.
* ``soft_target()``: the temperature and the target builder ``q`` of its distillation term
  (:class:`SoftTarget`), or ``None``. Tang et al.'s diagnostics read nothing else from a method.

What a method is: an ``nn.Module``. Its parameters (connectors, adapters) are optimised with the
student's; its state (class centres, projections) lives in buffers, so checkpoints and resume
carry it. Its hyper-parameters are its ``__init__`` arguments: ``@register_method`` turns the
typed signature into a Hydra structured-config schema, so a misspelt or ill-typed key in
``method.*`` fails at compose time.

The common step is written once, here: student forward (what ``reads`` asks for), teacher forward
under ``no_grad``, then ``loss(student_out, teacher_out, y, index)``. Methods override ``loss``;
a method that changes the step overrides ``training_step`` and nothing in the loop.

How the five seed methods plug in:

* **KDA** (kernel transfer with Nyström landmarks): ``reads={"logits","embedding"}``. Class
  centres of student and teacher are buffers; ``training_step`` calls the common step and
  accumulates per-class feature sums and counts; ``on_train_epoch_end(ctx)`` all-reduces them
  (``torch.distributed`` when initialised) and turns them into next epoch's centres. The loss is
  switched on from epoch ``warm`` via ``ctx.epoch``.
* **Backward-pass KD**: overrides ``training_step``: common terms, then generates auxiliary inputs
  by gradient ascent on the teacher–student divergence w.r.t. the input (teacher parameters stay
  frozen, input gradients flow through both models, BN statistics untouched) and adds the KL term
  on them. The offline variant regenerates an auxiliary set in ``on_train_epoch_start``.
* **Tang et al.** (ls, kd_pt, kd_sim, kd_pt_sim): ``setup`` reads the teacher's classifier weights
  (``teacher.classifier.weight``) to build the class-similarity matrix, kept as a buffer; ``loss``
  builds the per-example target distribution, which ``soft_target()`` hands to the diagnostics.
* **RdimKD**: ``reads={"logits","stages"}`` (or ``embedding``); ``setup(student, teacher,
  datamodule)`` probes shapes to size the student adapter and fits the projection (random
  orthogonal, PCA or an autoencoder over ``datamodule.train_eval_dataloader()``), stored as a buffer.
* **ProKT**: ``teacher_use=TeacherUse.TRAINED`` and ``manual_optimization=True``; ``teacher_optimizers``
  returns the teacher's optimizer and scheduler (the module appends them after the student's), and
  ``training_step`` runs the official order: student snapshot → teacher step → teacher snapshot →
  student step.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.models.base import LOGITS, ModelOutput, train_mode  # noqa: F401 - train_mode re-exported for methods

Terms = dict[str, Tensor]
METHODS: dict[str, type[DistillationMethod]] = {}


class TeacherUse(enum.Enum):
    """How a method uses its teacher: the one declaration the module, the teacher-output cache and
    the pipeline read."""

    NONE = "none"  # trains the student alone
    FROZEN = "frozen"  # reads a frozen teacher's outputs on the batch's input (a cache may serve them)
    LIVE = "live"  # frozen, but needs the live teacher (input gradients...); the method says why
    TRAINED = "trained"  # trains the teacher

    @property
    def needs_teacher(self) -> bool:
        return self is not TeacherUse.NONE

    @property
    def trains_teacher(self) -> bool:
        return self is TeacherUse.TRAINED

    @property
    def cacheable(self) -> bool:
        return self is TeacherUse.FROZEN


class DistillationMethod(nn.Module):
    reads: ClassVar[frozenset[str]] = frozenset({LOGITS})
    teacher_use: ClassVar[TeacherUse] = TeacherUse.FROZEN
    # why a LIVE or TRAINED method cannot train from stored teacher outputs (the cache's error says it)
    live_reason: ClassVar[str] = ""
    manual_optimization: ClassVar[bool] = False
    # reads a causal LM's per-position logits (B, L, V) and next-token targets (B, L): trains only on
    # language-modelling data (KDDataModule.input_kind == "lm"), and only such methods do
    token_level: ClassVar[bool] = False
    name: ClassVar[str] = "method"

    def setup(self, student: nn.Module, teacher: nn.Module | None, datamodule: Any) -> None:
        """Called once before training, after the teacher is ready (probe shapes, fit projections)."""

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], ctx: StepContext) -> Terms:
        x, y, index = batch
        student_out = ctx.student(x, self.reads)
        teacher_out = self.teacher_forward(ctx, x)
        return self.loss(student_out, teacher_out, y, index)

    def teacher_forward(self, ctx: StepContext, x: Tensor) -> ModelOutput | None:
        if not self.teacher_use.needs_teacher or ctx.teacher is None:
            return None
        cached = ctx.cached_teacher(x)
        if cached is not None:  # teacher.cache: the stored outputs of this very input
            return cached
        with torch.no_grad():
            return ctx.teacher(x, self.reads)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        raise NotImplementedError

    def run_warnings(self, max_epochs: int | None) -> list[str]:
        """Settings that are legal but likely not what the user meant for a run of ``max_epochs``
        (printed, and kept in metrics.json under ``warnings``)."""
        return []

    def sparse_target_problem(self) -> str | None:
        """Why the method cannot train from a sparse teacher target (``teacher.cache=topk``: top-k
        log-probs, :class:`~kdx.teacher_outputs.TopKTarget`), or None when it can."""
        return "it reads the teacher's full logits"

    def uses_teacher_weights(self) -> bool:
        """False when the method starts its teacher from random initialisation (ProKT's default):
        the teacher is then built but no checkpoint is loaded or trained for it."""
        return True

    def teacher_optimizers(self, teacher: nn.Module, build_scheduler: Callable[..., Any]) -> list[dict]:
        """Lightning optimizer configs for the teacher; only methods that train it return any.
        ``build_scheduler(factory, optimizer, interval)`` is the module's: it fills a scheduler's
        horizon (``T_max``, ``total_steps``) from the run's length, as for the student."""
        return []

    def soft_target(self) -> SoftTarget | None:
        """The soft target the method pulls ``softmax(z_s/T)`` towards, for Tang et al.'s diagnostics
        (:mod:`kdx.diagnostics`); ``None`` when the method has no such target (``none``, ``kda``,
        ``rdim``). A method that returns one must read its own attributes here (no defaults), so that
        renaming ``temperature`` fails at fit start instead of silently switching diagnostics off."""
        return None

    # Hooks the module forwards; the defaults do nothing.
    def on_fit_start(self, ctx: StepContext) -> None: ...
    def on_train_epoch_start(self, ctx: StepContext) -> None: ...
    def on_train_epoch_end(self, ctx: StepContext) -> None: ...
    def on_validation_epoch_end(self, ctx: StepContext) -> None: ...


@dataclasses.dataclass(frozen=True)
class SoftTarget:
    """What a method's distillation term is, as the diagnostics need it.

    ``target(y, teacher_logits, num_classes)`` returns the per-example distribution ``q`` (B, K) that
    the term ``T²·KL(q ‖ softmax(z_s/T))`` pulls the student towards (``teacher_logits`` is None for
    a method that reads no teacher). ``diagnostics_by_default``: ``callbacks.diagnostics.enabled=auto``
    switches the callback on for this method (the Tang et al. family).
    """

    temperature: float
    target: Callable[[Tensor, Tensor | None, int], Tensor]
    diagnostics_by_default: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SoftTarget.temperature={self.temperature} must be > 0")


def hinton_target(temperature: float) -> Callable[[Tensor, Tensor | None, int], Tensor]:
    """Hinton KD's target ``softmax(z_t/T)``."""

    def target(y: Tensor, teacher_logits: Tensor | None, num_classes: int) -> Tensor:
        if teacher_logits is None:
            raise ValueError("Hinton KD's target needs the teacher's logits")
        return F.softmax(teacher_logits.float() / temperature, dim=-1)

    return target


# ---------------------------------------------------------------------------------------------
# Registry and typed config schemas.

_OMEGACONF_TYPES = (int, float, bool, str)


def _schema_type(tp: Any) -> Any:
    """Map an annotation to one OmegaConf can validate; fall back to Any."""
    if tp in _OMEGACONF_TYPES:
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _OMEGACONF_TYPES:
            return rest[0] | None
    if origin in (list, tuple, Iterable) or tp in (list, tuple):
        inner = args[0] if args and args[0] in _OMEGACONF_TYPES else Any
        return list[inner]  # type: ignore[valid-type]
    if origin is dict or tp is dict:
        return dict[str, Any]
    return Any


def schema_of(cls: type) -> type:
    """A dataclass schema built from ``cls.__init__``'s typed signature, plus ``_target_``."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple] = [
        ("_target_", str, dataclasses.field(default=f"{cls.__module__}.{cls.__qualname__}"))
    ]
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        tp = _schema_type(hints.get(pname, Any))
        default = param.default
        if default is inspect.Parameter.empty:
            fields.append((pname, tp, dataclasses.field(default=dataclasses.MISSING)))
        elif isinstance(default, (list, dict, tuple)):
            fields.append(
                (
                    pname,
                    tp,
                    dataclasses.field(
                        default_factory=lambda d=default: type(d)(d) if not isinstance(d, tuple) else list(d)
                    ),
                )
            )
        else:
            fields.append((pname, tp, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def register_method(name: str):
    """Class decorator: record the method and store its schema as ``schema/method/<name>``.

    A method config then starts with ``defaults: [/schema/method/<name>@_here_, _self_]``.
    """

    def wrap(cls: type[DistillationMethod]) -> type[DistillationMethod]:
        cls.name = name
        METHODS[name] = cls
        ConfigStore.instance().store(group="schema/method", name=name, node=schema_of(cls))
        return cls

    return wrap
