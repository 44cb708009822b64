"""Models: kdx's zoo and the adapters that give every model the same output record."""

from kdx.models.adapter import FeatureModel, as_feature_model
from kdx.models.base import (
    EMBEDDING,
    LOGITS,
    PREACT_STAGES,
    STAGES,
    KDModel,
    ModelOutput,
    NoPreactStagesError,
    count_parameters,
)

__all__ = [
    "EMBEDDING",
    "LOGITS",
    "PREACT_STAGES",
    "STAGES",
    "FeatureModel",
    "KDModel",
    "ModelOutput",
    "NoPreactStagesError",
    "as_feature_model",
    "count_parameters",
]
