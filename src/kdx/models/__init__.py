"""Models: kdx's zoo and the adapters that give every model the same output record."""

from kdx.models.adapter import FeatureModel, as_feature_model
from kdx.models.base import EMBEDDING, LOGITS, STAGES, KDModel, ModelOutput, count_parameters

__all__ = [
    "EMBEDDING",
    "LOGITS",
    "STAGES",
    "FeatureModel",
    "KDModel",
    "ModelOutput",
    "as_feature_model",
    "count_parameters",
]
