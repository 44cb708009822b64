"""Pieces shared by feature-based methods: connectors, token views, lazily sized buffers.

A *feature* is a tensor ``(B, C)`` (an embedding, a token summary) or ``(B, C, *S)`` (a stage map
with one, two or three spatial axes; timm's ``forward_intermediates`` gives NCHW for ViTs too).

* :func:`to_tokens` views a feature as a token matrix ``(N, C)`` with ``N = B·ΠS``.
* :class:`Connector` brings a student feature to the teacher's layout: a spatial resize (adaptive
  average pooling when the student map is larger, linear/bilinear/trilinear interpolation when it is
  smaller), then a learned channel map (``nn.Linear`` for vectors, a 1×1 ``ConvNd`` for maps), or
  the identity when the widths already agree. When the two features do not have the same number of
  axes (an MLP's vector against a CNN's map), both sides are globally average-pooled to vectors.
  Resizing and a 1×1 map commute (both are linear, one per channel, one per position, and both
  keep constants), so the connector pools *before* the channel map and interpolates *after* it,
  whichever is cheaper. It is sized from probed shapes (``FeatureModel.probe``) in a method's
  ``setup``.
* :class:`LazyBuffers` lets a method declare buffers whose sizes are only known after probing
  (class centres, projections): loading a ``state_dict`` resizes them to the stored shapes first.
* The RepDistiller family (FitNet … NST, docs/baselines_feature.md): :func:`feature_list` (the
  official ``feat`` list, ``stages + [embedding]``), :func:`parse_layers` / :func:`select_layers`
  (which entries a method reads), :func:`match_spatial` (pool the larger map), :class:`ConvReg`
  (FitNet's regressor) and :class:`RepDistillerMethod`, the shared ``γ·CE + α·KL + β·term`` loss
  with its optional pre-training phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.errors import KDXError
from kdx.methods.base import DistillationMethod, Terms, kd_loss
from kdx.models.base import EMBEDDING, LOGITS, STAGES, ModelOutput

_INTERP_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_ADAPTIVE_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def to_tokens(x: Tensor) -> Tensor:
    """``(B, C)`` → itself; ``(B, C, *S)`` → ``(B·ΠS, C)`` (channels last, one row per position)."""
    if x.dim() == 2:
        return x
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


def global_pool(x: Tensor) -> Tensor:
    """``(B, C, *S)`` → ``(B, C)`` by averaging over the spatial axes; vectors pass through."""
    return x if x.dim() == 2 else x.flatten(2).mean(-1)


def resize_spatial(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a ``(B, C, *S)`` map to ``size``: adaptive average pooling when shrinking on every axis,
    interpolation (``align_corners=False``) otherwise; unchanged when the size already matches."""
    size = tuple(int(s) for s in size)
    current = tuple(x.shape[2:])
    if current == size:
        return x
    if len(size) not in _INTERP_MODE or len(size) != len(current):
        raise ValueError(f"cannot resize a map with spatial shape {current} to {size}")
    if all(c >= s for c, s in zip(current, size)):
        return _ADAPTIVE_POOL[len(size)](x, size)
    return F.interpolate(x, size=size, mode=_INTERP_MODE[len(size)], align_corners=False)


class Connector(nn.Module):
    """Maps a student feature of shape ``(B, *student_shape)`` to the teacher's ``(B, *teacher_shape)``.

    ``student_shape`` / ``teacher_shape`` leave out the batch axis: ``(C,)`` or ``(C, *S)``.
    ``forward(s)`` maps the student feature; ``teacher(t)`` gives the teacher feature in the layout
    the loss compares (pooled to a vector when the ranks differ, otherwise unchanged).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], bias: bool = True):
        super().__init__()
        student_shape, teacher_shape = (
            tuple(int(s) for s in student_shape),
            tuple(int(s) for s in teacher_shape),
        )
        if not student_shape or not teacher_shape:
            raise ValueError(
                f"features need a channel axis; got student {student_shape}, teacher {teacher_shape}"
            )
        self.student_shape, self.teacher_shape = student_shape, teacher_shape
        self.pool_both = len(student_shape) != len(teacher_shape)
        spatial_axes = 0 if self.pool_both else len(teacher_shape) - 1
        if spatial_axes > 3:
            raise ValueError(f"features with {spatial_axes} spatial axes are not supported")
        self.spatial: tuple[int, ...] = teacher_shape[1:] if spatial_axes else ()
        c_s, c_t = student_shape[0], teacher_shape[0]
        self.in_channels, self.out_channels = c_s, c_t
        if c_s == c_t:
            self.proj: nn.Module = nn.Identity()
        elif spatial_axes == 0:
            self.proj = nn.Linear(c_s, c_t, bias=bias)
        else:
            self.proj = _CONV[spatial_axes](c_s, c_t, kernel_size=1, bias=bias)

    @property
    def is_identity(self) -> bool:
        return isinstance(self.proj, nn.Identity)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.out_channels, *self.spatial)

    def forward(self, s: Tensor) -> Tensor:
        if self.pool_both or not self.spatial:
            return self.proj(global_pool(s))
        if all(c >= t for c, t in zip(s.shape[2:], self.spatial)):
            return self.proj(
                resize_spatial(s, self.spatial)
            )  # shrink first: the 1×1 map runs on fewer positions
        return resize_spatial(self.proj(s), self.spatial)

    def teacher(self, t: Tensor) -> Tensor:
        return global_pool(t) if self.pool_both else t

    def extra_repr(self) -> str:
        return f"student={self.student_shape}, teacher={self.teacher_shape}, pool_both={self.pool_both}"


class LazyBuffers(nn.Module):
    """Mixin for methods whose buffers are sized after probing: ``load_state_dict`` first resizes each
    own buffer to the stored shape, so a checkpoint loads into a method whose ``setup`` has not run."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name, buf in list(self._buffers.items()):
            stored = state_dict.get(prefix + name)
            if buf is not None and isinstance(stored, Tensor) and stored.shape != buf.shape:
                self._buffers[name] = torch.zeros(stored.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------
# The RepDistiller family (FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST): which features a
# method reads, the regressors it learns, and the loss it returns.
#
# RepDistiller's models return ``feat = [f0, f1, …, f_last, embedding]``: the stem output, each
# stage's output, then the pooled penultimate vector. kdx's zoo models give the same list as
# ``stages + [embedding]`` (:func:`feature_list`), so a method names its layers exactly as the
# official code does: ``feat[1:-1]`` (AT, VID, NST, AB), ``feat[-2]`` (SP, FT), ``feat[-1]`` (CC,
# RKD, PKT), ``feat[:-1]`` (FSP), ``feat[hint_layer]`` (FitNet).


def feature_list(out: ModelOutput) -> list[Tensor]:
    """RepDistiller's ``feat`` list: every stage output, then the embedding (when the model gave one)."""
    return [*out.stages, *([] if out.embedding is None else [out.embedding])]


def parse_layers(spec: str, param: str = "method.layers") -> slice | tuple[int, ...]:
    """``"1:-1"`` → ``slice(1, -1)``; ``"2"`` → ``(2,)``; ``"1,3"`` → ``(1, 3)`` (Python indexing)."""
    text = str(spec).replace(" ", "")
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            start, stop = (int(p) if p else None for p in parts)
            return slice(start, stop)
        indices = tuple(int(p) for p in text.split(","))
        if not indices:
            raise ValueError
        return indices
    except ValueError:
        raise ValueError(
            f"{param}={spec!r} is not a layer selection: write a Python slice of the feature list "
            "stages + [embedding] ('1:-1', ':-1') or indices ('2', '-1', '1,3')"
        ) from None


def select_layers(feats: list[Tensor], spec: slice | tuple[int, ...]) -> list[int]:
    """The (non-negative) positions of ``feats`` that ``spec`` picks; empty when it picks nothing."""
    n = len(feats)
    if isinstance(spec, slice):
        return list(range(n))[spec]
    out = []
    for i in spec:
        if not -n <= i < n:
            raise IndexError(i)
        out.append(i % n)
    return out


def spatial_rank(x: Tensor) -> int:
    """Number of spatial axes of a ``(B, C, *S)`` feature (0 for a ``(B, C)`` vector)."""
    return x.dim() - 2


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two maps to one spatial size by adaptive average pooling of the larger one on each axis
    (RepDistiller's rule in AT, VID, FT, FSP, NST); a map against a vector is pooled to a vector."""
    if spatial_rank(a) != spatial_rank(b):
        return global_pool(a), global_pool(b)
    if a.shape[2:] == b.shape[2:]:
        return a, b
    target = tuple(min(p, q) for p, q in zip(a.shape[2:], b.shape[2:]))
    pool = _ADAPTIVE_POOL[len(target)]
    return (
        a if tuple(a.shape[2:]) == target else pool(a, target),
        b if tuple(b.shape[2:]) == target else pool(b, target),
    )


CONV = _CONV  # ConvNd by number of spatial axes
BATCH_NORM = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class ConvReg(nn.Module):
    """RepDistiller's FitNet/AB regressor (``models/util.py: ConvReg``), for any number of spatial axes.

    Maps a student feature ``(B, *student_shape)`` to the teacher's layout, then BatchNorm and (with
    ``use_relu``) ReLU. On maps: a 3×3 stride-2 conv when the student map is twice the teacher's on
    every axis, a 4×4 stride-2 transposed conv when it is half, else a conv of kernel
    ``1 + s − t`` per axis (a 1×1 conv at equal sizes). On vectors: a linear layer. When the ranks
    differ (an MLP's vector against a CNN's map) both sides are globally pooled to vectors first
    (kdx's :class:`Connector` convention); :meth:`teacher` gives the teacher side in that layout.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        s, t = tuple(int(v) for v in student_shape), tuple(int(v) for v in teacher_shape)
        self.student_shape, self.teacher_shape, self.use_relu = s, t, use_relu
        self.pool_both = len(s) != len(t)
        axes = 0 if self.pool_both else len(t) - 1
        if axes > 3:
            raise ValueError(f"features with {axes} spatial axes are not supported")
        c_s, c_t = s[0], t[0]
        if axes == 0:
            self.conv: nn.Module = nn.Linear(c_s, c_t)
        else:
            s_size, t_size = s[1:], t[1:]
            if all(a == 2 * b for a, b in zip(s_size, t_size)):
                self.conv = _CONV[axes](c_s, c_t, kernel_size=3, stride=2, padding=1)
            elif all(2 * a == b for a, b in zip(s_size, t_size)):
                self.conv = CONV_TRANSPOSE[axes](c_s, c_t, kernel_size=4, stride=2, padding=1)
            elif all(a >= b for a, b in zip(s_size, t_size)):
                self.conv = _CONV[axes](
                    c_s, c_t, kernel_size=tuple(1 + a - b for a, b in zip(s_size, t_size))
                )
            else:
                raise ValueError(
                    f"no regressor maps a student map of spatial size {s_size} to the teacher's {t_size}: "
                    "the student map must be twice, half, or at least the teacher's size on every axis"
                )
        self.bn = BATCH_NORM[axes](c_t)
        self.relu = nn.ReLU()

    def forward(self, s: Tensor) -> Tensor:
        out = self.bn(self.conv(global_pool(s) if self.pool_both else s))
        return self.relu(out) if self.use_relu else out

    def teacher(self, t: Tensor) -> Tensor:
        return global_pool(t) if self.pool_both else t

    def extra_repr(self) -> str:
        return f"student={self.student_shape}, teacher={self.teacher_shape}, pool_both={self.pool_both}"


def pointwise_layer(c_in: int, c_out: int, spatial_axes: int, bias: bool = True) -> nn.Module:
    """A per-position channel map: ``nn.Linear`` on vectors, a 1×1 ``ConvNd`` on maps."""
    if spatial_axes == 0:
        return nn.Linear(c_in, c_out, bias=bias)
    return _CONV[spatial_axes](c_in, c_out, kernel_size=1, bias=bias)


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
