"""Adapters: every model, whatever its origin, seen as ``x -> ModelOutput``.

``as_feature_model(model)`` picks the adapter:

* kdx zoo models (:class:`~kdx.models.base.KDModel`): native ``extract``.
* timm models: ``forward_intermediates`` for stages, ``forward_head(pre_logits=True)`` for the
  embedding.
* anything else (torchvision, a user's module): forward hooks on named module paths for stages and
  on the final linear layer's input for the embedding.

Only what the caller asks for (``reads``) is computed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kdx.models.base import EMBEDDING, LOGITS, STAGES, KDModel, ModelOutput


class FeatureModel(nn.Module):
    """Wraps a classifier so that ``forward(x, reads)`` returns a :class:`ModelOutput`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def classifier(self) -> nn.Linear:
        raise NotImplementedError

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        raise NotImplementedError

    @torch.no_grad()
    def probe(self, input_shape: tuple[int, ...], reads: Iterable[str] = (LOGITS, EMBEDDING, STAGES)) -> ModelOutput:
        """Forward a zero batch of two in eval mode, to read output shapes."""
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            return self(torch.zeros(2, *input_shape, device=device), reads)
        finally:
            self.train(was_training)


class NativeFeatureModel(FeatureModel):
    model: KDModel

    @property
    def classifier(self) -> nn.Linear:
        return self.model.classifier

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        if reads <= {LOGITS}:
            return ModelOutput(self.model(x))
        return self.model.extract(x, stages=STAGES in reads)


class TimmFeatureModel(FeatureModel):
    """timm's own split; stages via ``forward_intermediates`` when asked."""

    @property
    def classifier(self) -> nn.Linear:
        head = self.model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"timm model's classifier is {type(head).__name__}, not nn.Linear")
        return head

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        if reads <= {LOGITS}:
            return ModelOutput(self.model(x))
        if STAGES in reads:
            final, stages = self.model.forward_intermediates(x)
        else:
            final, stages = self.model.forward_features(x), []
        embedding = self.model.forward_head(final, pre_logits=True)
        return ModelOutput(self.model.get_classifier()(embedding), embedding, list(stages))


class HookFeatureModel(FeatureModel):
    """Any ``nn.Module`` classifier: hooks read the classifier's input and named stage outputs."""

    def __init__(self, model: nn.Module, stage_names: list[str] | None = None, classifier_name: str | None = None):
        super().__init__(model)
        modules = dict(model.named_modules())
        if classifier_name is None:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"{type(model).__name__} has no nn.Linear to use as classifier; "
                                 "name it with classifier_name=<module path>")
            classifier_name = linears[-1]
        self.classifier_name = classifier_name
        self.stage_names = list(stage_names or [])
        for name in [classifier_name, *self.stage_names]:
            if name not in modules:
                available = ", ".join(n for n in modules if n) or "(none)"
                raise ValueError(f"module path '{name}' does not exist in {type(model).__name__}; "
                                 f"available: {available}")

    @property
    def classifier(self) -> nn.Linear:
        return dict(self.model.named_modules())[self.classifier_name]

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        if reads <= {LOGITS}:
            return ModelOutput(self.model(x))
        modules = dict(self.model.named_modules())
        captured: dict[str, Tensor] = {}
        handles = []
        if EMBEDDING in reads:
            handles.append(modules[self.classifier_name].register_forward_pre_hook(
                lambda _m, args: captured.__setitem__("__embedding__", args[0])))
        if STAGES in reads:
            for name in self.stage_names:
                handles.append(modules[name].register_forward_hook(
                    lambda _m, _a, out, name=name: captured.__setitem__(name, out)))
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return ModelOutput(logits, captured.get("__embedding__"), [captured[n] for n in self.stage_names if n in captured])


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "forward_head")


def as_feature_model(model: nn.Module, stage_names: list[str] | None = None,
                     classifier_name: str | None = None) -> FeatureModel:
    if isinstance(model, FeatureModel):
        return model
    if isinstance(model, KDModel) and not stage_names:
        return NativeFeatureModel(model)
    if is_timm_model(model) and not stage_names:
        return TimmFeatureModel(model)
    return HookFeatureModel(model, stage_names, classifier_name)
