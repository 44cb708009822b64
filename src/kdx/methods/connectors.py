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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
