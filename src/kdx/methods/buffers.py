"""Buffers whose sizes are only known after a method probes the models (class centres, projections)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
