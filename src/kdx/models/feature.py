"""The interface every model adapter implements: ``forward(x, reads) -> ModelOutput``.

Its own module so that the adapters (:mod:`kdx.models.adapter`) and the Hugging Face wrapper
(:mod:`kdx.models.hf`), which the adapter picks for transformers models, both build on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kdx.models.base import (
    EMBEDDING,
    LOGITS,
    PREACT_STAGES,
    STAGES,
    ModelOutput,
    no_preact_stages,
    train_mode,
)


class FeatureModel(nn.Module):
    """Wraps a classifier so that ``forward(x, reads)`` returns a :class:`ModelOutput`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training  # a wrapper starts in its model's mode (``probe`` restores it)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def classifier(self) -> nn.Linear:
        raise NotImplementedError

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        raise NotImplementedError

    def refuse_preact(self, reads: set[str]) -> None:
        """Adapters without pre-activation stages: a clear error when ``PREACT_STAGES`` is read."""
        if PREACT_STAGES in reads:
            raise no_preact_stages(self.model, via=type(self).__name__)

    @torch.no_grad()
    def probe(
        self, input_shape: tuple[int, ...], reads: Iterable[str] = (LOGITS, EMBEDDING, STAGES)
    ) -> ModelOutput:
        """Forward a zero batch of two in eval mode, to read output shapes."""
        with train_mode(self, False):
            param = next(self.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            return self(torch.zeros(2, *input_shape, device=device), reads)
