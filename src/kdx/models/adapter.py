"""Adapters: every model, whatever its origin, seen as ``x -> ModelOutput``.

``as_feature_model(model, stage_names)`` picks the adapter:

* kdx zoo models (:class:`~kdx.models.base.KDModel`): native ``extract``.
* timm models: ``forward_intermediates`` for stages, ``forward_head(pre_logits=True)`` for the
  embedding.
* torchvision models given ``stage_names``: a ``torchvision.models.feature_extraction`` graph
  (names are graph nodes or module paths, e.g. ``layer1`` … ``layer4`` or ``layer1.0.add``);
  if the model cannot be traced, hooks.
* anything else (a user's module, or any model given ``stage_names``): forward hooks on the named
  module paths for stages and on the final linear layer's input for the embedding.

Only what the caller asks for (``reads``) is computed: logits alone is a plain ``model(x)`` with no
hook, no graph and no intermediate kept. Pre-activation stages (``PREACT_STAGES``) come only from
zoo models that define them; every other adapter refuses the read with
:class:`~kdx.models.base.NoPreactStagesError`, naming the model.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import Tensor, nn

from kdx.errors import StageNameError
from kdx.models.base import EMBEDDING, LOGITS, PREACT_STAGES, STAGES, KDModel, ModelOutput
from kdx.models.feature import FeatureModel
from kdx.models.hf import is_transformers_classifier, wrap_transformers_model


class NativeFeatureModel(FeatureModel):
    model: KDModel

    @property
    def classifier(self) -> nn.Linear:
        return self.model.classifier

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        if reads <= {LOGITS}:
            return ModelOutput(self.model(x))
        return self.model.extract(x, stages=STAGES in reads, preact_stages=PREACT_STAGES in reads)


class TimmFeatureModel(FeatureModel):
    """timm's own split; stages via ``forward_intermediates`` when asked."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.classifier  # noqa: B018 - fail now, not at the first step, if the head is not a Linear

    @property
    def classifier(self) -> nn.Linear:
        head = self.model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"timm model's classifier is {type(head).__name__}, not nn.Linear")
        return head

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        self.refuse_preact(reads)
        if reads <= {LOGITS}:
            return ModelOutput(self.model(x))
        if STAGES in reads:
            if not hasattr(self.model, "forward_intermediates"):
                raise TypeError(
                    f"timm model {type(self.model).__name__} has no forward_intermediates; "
                    "give stage_names (module paths) to read stages through hooks"
                )
            final, stages = self.model.forward_intermediates(x)
        else:
            final, stages = self.model.forward_features(x), []
        embedding = self.model.forward_head(final, pre_logits=True)
        return ModelOutput(self.model.get_classifier()(embedding), embedding, list(stages))


def _last_linear(model: nn.Module) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StageNameError(
            f"{type(model).__name__} has no nn.Linear to use as classifier; "
            "name it with classifier_name=<module path>"
        )
    return linears[-1]


def _missing(kind: str, name: str, model: nn.Module, available: Iterable[str]) -> StageNameError:
    names = ", ".join(n for n in available if n) or "(none)"
    return StageNameError(f"{kind} '{name}' does not exist in {type(model).__name__}; available: {names}")


class HookFeatureModel(FeatureModel):
    """Any ``nn.Module`` classifier: hooks read the classifier's input and named stage outputs.

    Hooks are registered for one forward and removed right after, so a logits-only forward, a
    ``deepcopy`` or a ``state_dict`` never sees them.
    """

    def __init__(
        self, model: nn.Module, stage_names: list[str] | None = None, classifier_name: str | None = None
    ):
        super().__init__(model)
        self.classifier_name = classifier_name or _last_linear(model)
        self.stage_names = list(stage_names or [])
        modules = dict(model.named_modules())
        if self.classifier_name not in modules:
            raise _missing("classifier module path", self.classifier_name, model, modules)
        self._check_stage_names()

    def _check_stage_names(self) -> None:
        modules = dict(self.model.named_modules())
        for name in self.stage_names:
            if name not in modules:
                raise _missing("module path", name, self.model, modules)

    @property
    def classifier(self) -> nn.Linear:
        return self.model.get_submodule(self.classifier_name)

    def _run(self, fn, x: Tensor, reads: set[str], stage_modules: dict[str, nn.Module]):
        """Call ``fn(x)`` with hooks for the embedding (if read) and the given stage modules."""
        captured: dict[str, Tensor] = {}
        handles = []
        if EMBEDDING in reads:
            handles.append(
                self.classifier.register_forward_pre_hook(
                    lambda _m, args: captured.__setitem__("__embedding__", args[0])
                )
            )
        for name, module in stage_modules.items():
            handles.append(
                module.register_forward_hook(lambda _m, _a, out, name=name: captured.__setitem__(name, out))
            )
        try:
            out = fn(x)
        finally:
            for h in handles:
                h.remove()
        return out, captured

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        self.refuse_preact(reads)
        if reads <= {LOGITS}:
            return ModelOutput(self.model(x))
        stage_modules = {n: self.model.get_submodule(n) for n in self.stage_names} if STAGES in reads else {}
        logits, captured = self._run(self.model, x, reads, stage_modules)
        return ModelOutput(
            logits, captured.get("__embedding__"), [captured[n] for n in stage_modules if n in captured]
        )


class GraphFeatureModel(HookFeatureModel):
    """torchvision models: stages from a ``create_feature_extractor`` graph of the model.

    Names may be graph nodes (``get_graph_node_names``) or module paths (the module's last node).
    The graph shares the model's parameters; it is kept out of the module tree (no duplicate
    state-dict keys), built at the first stages read and rebuilt after a copy or unpickling.
    """

    _LOGITS_KEY = "__logits__"

    def _check_stage_names(self) -> None:
        from torchvision.models.feature_extraction import get_graph_node_names

        graphs = get_graph_node_names(self.model)  # (train nodes, eval nodes); raises if untraceable
        for name in self.stage_names:
            pattern = re.compile(rf"^{re.escape(name)}(\.|$)")
            for nodes in graphs:
                if not any(pattern.match(n) for n in nodes):
                    raise _missing("graph node or module path", name, self.model, nodes)

    def _extractor(self) -> nn.Module:
        ext = self.__dict__.get("_graph")
        if ext is None:
            from torchvision.models.feature_extraction import create_feature_extractor

            nodes = {n: n for n in self.stage_names} | {self.classifier_name: self._LOGITS_KEY}
            ext = create_feature_extractor(self.model, return_nodes=nodes, suppress_diff_warning=True)
            self.__dict__["_graph"] = ext  # a plain attribute: not a submodule
        if ext.training != self.model.training:  # the graph differs between train and eval
            ext.train(self.model.training)
        return ext

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_graph", None)
        return state

    def forward(self, x: Tensor, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        self.refuse_preact(reads)
        if STAGES not in reads:
            return super().forward(x, reads)
        out, captured = self._run(self._extractor(), x, reads, {})
        return ModelOutput(
            out[self._LOGITS_KEY], captured.get("__embedding__"), [out[n] for n in self.stage_names]
        )


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "forward_head")


def is_torchvision_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models")


def as_feature_model(
    model: nn.Module, stage_names: list[str] | None = None, classifier_name: str | None = None
) -> FeatureModel:
    """The adapter for ``model``; ``stage_names`` (module paths / graph nodes) override native stages."""
    if isinstance(model, FeatureModel):
        return model
    stage_names = list(stage_names or [])
    if callable(getattr(model, "feature_model", None)) and not stage_names:
        return model.feature_model()  # a model that brings its own adapter (kdx.models.hf)
    if type(model).__module__.startswith("transformers.") and not stage_names:
        if is_transformers_classifier(model):
            return wrap_transformers_model(model)
    if isinstance(model, KDModel) and not stage_names:
        return NativeFeatureModel(model)
    if is_timm_model(model) and not stage_names:
        return TimmFeatureModel(model)
    if is_torchvision_model(model) and stage_names:
        try:
            return GraphFeatureModel(model, stage_names, classifier_name)
        except StageNameError:
            raise
        except Exception as err:  # not FX-traceable: module paths through hooks still work
            warnings.warn(
                f"{type(model).__name__} cannot be traced ({err}); reading stages through hooks", stacklevel=2
            )
    return HookFeatureModel(model, stage_names, classifier_name)
