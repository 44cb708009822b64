"""Connectors: modules that bring a student feature to the teacher's layout.

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
* :class:`ConvReg` is RepDistiller's FitNet/AB regressor; :func:`pointwise_layer` a per-position
  channel map.

Which features a RepDistiller-family method reads is in :mod:`kdx.methods.feature_layers`; the
family's loss in :mod:`kdx.methods.repdistiller`; buffers sized after probing in
:mod:`kdx.methods.buffers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

_INTERP_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
ADAPTIVE_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


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
        return ADAPTIVE_POOL[len(size)](x, size)
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
