"""``sp``: Tung & Mori, *Similarity-Preserving Knowledge Distillation* (ICCV 2019).

Formula (RepDistiller ``distiller_zoo/SP.py``, "verified by original author"): the batch's Gram
matrix of flattened features, each row L2-normalised, and the squared Frobenius distance of the two
matrices over b²::

    G = normalize_rows(F Fᵀ)          F = the (B, C·ΠS) flattened feature
    L_sp = Σ_layers ‖G_t − G_s‖²_F / B²
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_sp

Defaults (RepDistiller ``train_loops``: ``g_s = [feat_s[-2]]``; ``scripts/run_cifar_distill.sh``):
layers = ``feat[-2]`` (the last stage's output), weight β = 3000 (``-b 3000``), γ = 1, α = 0.

Deviations from the paper: none in the formula (the paper's γ = 3000 on CIFAR as well). Any feature
shape works (a vector or a map); an MLP student reads its last hidden layer.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdx.methods.base import register_method
from kdx.methods.feature_layers import feature_list
from kdx.methods.repdistiller import LayerPairsMethod
from kdx.models.base import ModelOutput


def similarity_matrix(f: Tensor) -> Tensor:
    """``normalize_rows(F Fᵀ)`` of the flattened feature: (B, …) → (B, B)."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``‖G_t − G_s‖²_F / B²``; the teacher side is detached."""
    batch = f_s.shape[0]
    return (similarity_matrix(f_t.detach()) - similarity_matrix(f_s)).pow(2).sum() / batch**2


@register_method("sp")
class SP(LayerPairsMethod):
    def __init__(
        self,
        weight: float = 3000.0,
        layers: str = "-2",
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature)
        self.use_layers(layers)

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        feats_s, feats_t = feature_list(student), feature_list(teacher)
        return sum(sp_loss(feats_s[i], feats_t[j]) for i, j in self.pairs)
