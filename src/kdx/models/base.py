"""The one record every model gives: logits, embedding, stages.

Zoo models subclass :class:`KDModel` and return the record natively through ``extract``;
foreign models (timm, torchvision, a user's ``nn.Module``) get it through
:mod:`kdx.models.adapter`. ``forward`` always returns plain logits, so a model is still an
ordinary classifier for code that knows nothing of kdx (the plain loop in ``kdx-bench``,
``torch.compile``, export).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor, nn

# What a method may ask a model for (``DistillationMethod.reads``).
LOGITS, EMBEDDING, STAGES = "logits", "embedding", "stages"
READABLE = frozenset({LOGITS, EMBEDDING, STAGES})


@dataclass
class ModelOutput:
    logits: Tensor  # (B, K)
    embedding: Tensor | None = None  # (B, D): the classifier's input
    stages: list[Tensor] = field(default_factory=list)  # feature map at the end of each stage

    def detach(self) -> ModelOutput:
        return ModelOutput(
            self.logits.detach(),
            None if self.embedding is None else self.embedding.detach(),
            [s.detach() for s in self.stages],
        )


class KDModel(nn.Module):
    """Base for kdx's own models: timm-style ``forward_features`` / ``forward_head`` split.

    Subclasses set ``num_classes``, ``embedding_dim`` and ``classifier`` (the final ``nn.Linear``)
    and implement ``forward_features(x, stages) -> (embedding, [stage maps])``; they compute the
    stage list only when ``stages`` is true.
    """

    num_classes: int
    embedding_dim: int
    classifier: nn.Linear

    def forward_features(self, x: Tensor, stages: bool = False) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def forward_head(self, embedding: Tensor) -> Tensor:
        return self.classifier(embedding)

    def forward(self, x: Tensor) -> Tensor:
        embedding, _ = self.forward_features(x, stages=False)
        return self.forward_head(embedding)

    def extract(self, x: Tensor, stages: bool = False) -> ModelOutput:
        embedding, maps = self.forward_features(x, stages=stages)
        return ModelOutput(self.forward_head(embedding), embedding, maps)


def run_stages(x: Tensor, layers, keep: bool, maps: list[Tensor]) -> Tensor:
    """Apply ``layers`` in order; append each output to ``maps`` only when ``keep`` (stages were asked for)."""
    for layer in layers:
        x = layer(x)
        if keep:
            maps.append(x)
    return x


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def train_mode(model: nn.Module | None, training: bool) -> Iterator[nn.Module | None]:
    """``model`` (every submodule) in train (``True``) or eval (``False``) mode inside the block; each
    submodule's own mode is restored on exit. ``None`` is accepted and left alone. In eval mode
    BatchNorm uses and keeps its running statistics and dropout is off."""
    if model is None:
        yield None
        return
    saved = [(m, m.training) for m in model.modules()]
    for m, _ in saved:
        m.training = training
    try:
        yield model
    finally:
        for m, was in saved:
            m.training = was
