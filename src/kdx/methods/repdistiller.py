"""The RepDistiller family's base classes: the shared ``γ·CE + α·KL + β·term`` loss with its optional
pre-training phase (:class:`RepDistillerMethod`), and the methods whose only setup is pairing layers
(:class:`LayerPairsMethod`). See docs/baselines_feature.md."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.errors import KDXError
from kdx.losses import kd_loss
from kdx.methods.base import DistillationMethod, Terms
from kdx.methods.feature_layers import feature_list, parse_layers, select_layers, spatial_rank
from kdx.models.base import EMBEDDING, LOGITS, STAGES, ModelOutput


class RepDistillerMethod(DistillationMethod):
    """Base of the feature methods: ``L = ce_weight·CE + kd_weight·T²·KL + weight·term``.

    RepDistiller's ``train_student.py`` writes the loss as ``γ·CE + α·KL + β·term`` (``-r -a -b``);
    ``ce_weight``, ``kd_weight`` and ``weight`` are γ, α, β. Its scripts run every feature method
    with γ = 1, α = 0 and a per-method β. A subclass implements :meth:`feature_term` (the term β
    multiplies) and, when it has a pre-training phase, :meth:`init_term`.

    Pre-training (RepDistiller's ``--init_epochs``, ``helper/pretrain.py``) is a phase of its own,
    run by the pipeline before the main fit (:mod:`kdx.pipeline.pretrain`): for ``init_epochs``
    epochs :meth:`init_training_step` returns ``loss = init_term`` alone, optimised by a fresh
    optimizer over :meth:`init_modules` at :meth:`init_lr`, without a schedule; the main phase then
    starts with its own optimizer and runs all of ``trainer.max_epochs``. :meth:`training_step` is
    always the main phase.
    """

    reads = frozenset({LOGITS, EMBEDDING, STAGES})

    def __init__(
        self,
        weight: float,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        init_epochs: int = 0,
    ):
        super().__init__()
        for param, value in (("weight", weight), ("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if value < 0:
                raise ValueError(f"method.{param}={value} must be >= 0")
        if temperature <= 0:
            raise ValueError(f"method.temperature={temperature} must be > 0")
        if init_epochs < 0:
            raise ValueError(f"method.init_epochs={init_epochs} must be >= 0")
        self.weight, self.ce_weight, self.kd_weight = weight, ce_weight, kd_weight
        self.temperature, self.init_epochs = temperature, init_epochs
        self._ready = False  # set by setup(): connectors exist and the pair was checked

    # -- setup helpers -------------------------------------------------------------------------
    def probe_features(
        self, student: Any, teacher: Any, datamodule: Any, features: Any = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The feature lists (``features(output)``, default :func:`feature_list`) of a zero batch
        through both models (shapes only)."""
        if teacher is None:
            raise KDXError(f"method {self.name} needs a teacher; pick one (e.g. teacher=cnn1d)")
        input_shape = None if datamodule is None else datamodule.input_shape
        if input_shape is None:
            raise KDXError(
                f"method {self.name} sizes its connectors by probing the models: "
                "its setup() needs a datamodule with an input_shape"
            )
        shape, features = tuple(input_shape), features or feature_list
        return features(student.probe(shape, self.reads)), features(teacher.probe(shape, self.reads))

    def layer_pairs(
        self, feats_s: list[Tensor], feats_t: list[Tensor], spec: slice | tuple[int, ...], param: str
    ) -> list[tuple[int, int]]:
        """Positions of the student and teacher layers ``spec`` picks, paired one to one."""
        try:
            s_idx, t_idx = select_layers(feats_s, spec), select_layers(feats_t, spec)
        except IndexError as err:
            raise KDXError(
                f"{self.name}: {param} picks layer {err.args[0]}, but the feature lists "
                f"(stages + [embedding]) have {len(feats_s)} (student) and {len(feats_t)} (teacher) entries"
            ) from None
        if not s_idx or len(s_idx) != len(t_idx):
            raise KDXError(
                f"{self.name} pairs student and teacher layers one to one, but {param} picks "
                f"{len(s_idx)} student and {len(t_idx)} teacher layers (feature lists stages + [embedding] "
                f"of {len(feats_s)} and {len(feats_t)}); set {param} to pick equally many (at least one)"
            )
        return list(zip(s_idx, t_idx))

    def require_maps(
        self, feats_s: list[Tensor], feats_t: list[Tensor], pairs: list[tuple[int, int]]
    ) -> None:
        """Refuse pairs where a side is a vector: the method reads spatial positions."""
        for i, j in pairs:
            for who, f, k in (("student", feats_s[i], i), ("teacher", feats_t[j], j)):
                if spatial_rank(f) < 1:
                    raise KDXError(
                        f"{self.name} needs feature maps with spatial axes, but the {who}'s layer {k} is a "
                        f"vector of shape {tuple(f.shape[1:])} (an MLP, or the embedding); use a "
                        "convolutional pair or another method (e.g. method=rkd, pkt, cc, sp)"
                    )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not self._ready:
            # No setup ran (kdx-eval tests a run's checkpoint): there are no connectors to load into,
            # and they only serve training, so their stored weights are skipped, not an error.
            unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(prefix)]

    def check_ready(self) -> None:
        if not self._ready:
            raise RuntimeError(f"{self.name}: call setup(student, teacher, datamodule) before the first step")

    # -- pre-training phase ------------------------------------------------------------------
    def init_training_step(self, batch: tuple[Tensor, Tensor, Tensor], ctx: StepContext) -> Terms:
        """One step of the pre-training phase: ``loss = init_term``, unweighted, as the official init
        loop optimises it."""
        term = self.init_step(batch[0], ctx)
        return {"loss": term, f"{self.name}_init": term}

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        """What the pre-training phase trains (in train mode; everything else stays in eval mode):
        RepDistiller's ``init_trainable_list`` (default: the student and the method's modules)."""
        return [student, self]

    def init_lr(self, student_name: str, lr: float) -> float:
        """The pre-training optimizer's learning rate, given the student's name and main-phase lr."""
        return lr

    def init_step(self, x: Tensor, ctx: StepContext) -> Tensor:
        """The pre-training loss of one batch (default: both models' features into :meth:`init_term`)."""
        return self.init_term(ctx.student(x, self.reads), self.teacher_forward(ctx, x))

    def init_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        raise NotImplementedError(f"{self.name} has no pre-training phase")

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor | dict[str, Tensor]:
        """The term β multiplies; or a dict holding it under the method's name plus parts to log."""
        raise NotImplementedError

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        self.check_ready()
        ce = F.cross_entropy(student.logits, y)
        terms: Terms = {"ce": ce}
        loss = self.ce_weight * ce
        if self.kd_weight > 0:
            terms["kd"] = kd_loss(student.logits, teacher.logits, self.temperature)
            loss = loss + self.kd_weight * terms["kd"]
        if self.weight > 0:
            term = self.feature_term(student, teacher)
            if isinstance(term, dict):
                terms.update(term)
                term = term[self.name]
            terms[self.name] = term
            loss = loss + self.weight * term
        terms["loss"] = loss
        return terms


class LayerPairsMethod(RepDistillerMethod):
    """A feature method whose only setup is pairing student and teacher layers (``method.layers``)."""

    needs_maps: bool = False  # spatial maps on both sides of every pair (AT, NST), not vectors

    def use_layers(self, layers: str) -> None:
        self.layers, self._spec = layers, parse_layers(layers)
        self.pairs: list[tuple[int, int]] = []

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        feats_s, feats_t = self.probe_features(student, teacher, datamodule)
        self.pairs = self.layer_pairs(feats_s, feats_t, self._spec, "method.layers")
        if self.needs_maps:
            self.require_maps(feats_s, feats_t, self.pairs)
        self._ready = True
