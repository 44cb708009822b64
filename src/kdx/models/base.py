"""The one record every model gives: logits, embedding, stages (and, on request, pre-activation stages).

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
from typing import Any

from torch import Tensor, nn

from kdx.errors import KDXError

# What a method may ask a model for (``DistillationMethod.reads``).
LOGITS, EMBEDDING, STAGES = "logits", "embedding", "stages"
# The stage maps taken before each stage's final activation, as RepDistiller's
# ``forward(x, is_feat=True, preact=True)`` gives them (AB, the "Overhaul" family): only the CIFAR
# zoo defines them; every other model refuses the read (:class:`NoPreactStagesError`).
PREACT_STAGES = "preact_stages"
READABLE = frozenset({LOGITS, EMBEDDING, STAGES, PREACT_STAGES})


class NoPreactStagesError(KDXError, ValueError):
    """``preact_stages`` was read from a model that has no pre-activation definition."""


def no_preact_stages(model: nn.Module, via: str = "") -> NoPreactStagesError:
    """The error for a model that cannot give ``preact_stages`` (``via``: the adapter, if any)."""
    name = type(model).__name__
    where = f" (read through {via})" if via else ""
    return NoPreactStagesError(
        f"model {name}{where} has no pre-activation stage features ('{PREACT_STAGES}'): kdx defines "
        "them, as RepDistiller's preact=True does, only for the CIFAR zoo (resnet8..110, resnet8x4, "
        "resnet32x4, wrn_*, vgg*, mobile_half, shufflenetv1, shufflenetv2, resnet18/34/50_cifar); "
        f"read '{STAGES}' (post-activation) from {name} instead"
    )


@dataclass
class ModelOutput:
    logits: Tensor  # (B, K)
    embedding: Tensor | None = None  # (B, D): the classifier's input
    stages: list[Tensor] = field(default_factory=list)  # feature map at the end of each stage
    # the same stages before their final activation (filled only when PREACT_STAGES is read)
    preact_stages: list[Tensor] = field(default_factory=list)
    # a sparse teacher target in place of full logits (kdx.teacher_outputs.TopKTarget: the top-k
    # log-probs of a causal LM's vocabulary, served by teacher.cache=topk; logits is None then)
    topk: Any = None

    def detach(self) -> ModelOutput:
        return ModelOutput(
            self.logits.detach(),
            None if self.embedding is None else self.embedding.detach(),
            [s.detach() for s in self.stages],
            [s.detach() for s in self.preact_stages],
            self.topk,
        )


class KDModel(nn.Module):
    """Base for kdx's own models: timm-style ``forward_features`` / ``forward_head`` split.

    Subclasses set ``num_classes``, ``embedding_dim`` and ``classifier`` (the final ``nn.Linear``)
    and implement ``forward_features(x, stages) -> (embedding, [stage maps])``; they compute the
    stage list only when ``stages`` is true. Models with a pre-activation definition also implement
    ``forward_preact_features(x, stages) -> (embedding, [stage maps], [pre-activation maps])``;
    the others refuse it with :class:`NoPreactStagesError`.
    """

    num_classes: int
    embedding_dim: int
    classifier: nn.Linear

    def forward_features(self, x: Tensor, stages: bool = False) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def forward_preact_features(
        self, x: Tensor, stages: bool = False
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        raise no_preact_stages(self)

    def forward_head(self, embedding: Tensor) -> Tensor:
        return self.classifier(embedding)

    def forward(self, x: Tensor) -> Tensor:
        embedding, _ = self.forward_features(x, stages=False)
        return self.forward_head(embedding)

    def extract(self, x: Tensor, stages: bool = False, preact_stages: bool = False) -> ModelOutput:
        if preact_stages:
            embedding, maps, preact = self.forward_preact_features(x, stages=stages)
        else:
            (embedding, maps), preact = self.forward_features(x, stages=stages), []
        return ModelOutput(self.forward_head(embedding), embedding, maps, preact)


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
