"""``at``: Zagoruyko & Komodakis, *Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer* (ICLR 2017).

Formula (RepDistiller ``distiller_zoo/AT.py``): the attention map of a feature ``f`` (B, C, *S) is the
L2-normalised channel mean of ``f^p`` over the positions; the term sums, over the paired layers,
the mean squared difference of the two maps (the larger map first average-pooled to the smaller)::

    a(f) = normalize(mean_c f_c^p)            (a vector of ΠS entries per example)
    L_at = Σ_layers mean((a(f_s) − a(f_t))²)
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_at

Defaults (RepDistiller ``train_student.py`` / ``scripts/run_cifar_distill.sh``): layers =
``feat[1:-1]`` (every stage output but the stem's), p = 2 (``Attention(p=2)``), weight β = 1000
(``-b 1000``), γ = 1, α = 0.

Deviations from the paper: the paper's loss is ``β/2 · Σ ‖a_s − a_t‖_2`` (a norm, not a mean of
squares) with β = 1000 / (elements of the map × batch); we follow RepDistiller's mean of squared
differences. Maps of unequal sizes are pooled to the elementwise smaller size (RepDistiller pools to
a square of the smaller height; the same for square maps). Vectors (an MLP's layers) have no
positions and are refused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdx.methods.base import register_method
from kdx.methods.feature_layers import feature_list, match_spatial
from kdx.methods.repdistiller import LayerPairsMethod
from kdx.models.base import ModelOutput


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """``normalize(mean_c f^p)``: (B, C, *S) → (B, ΠS), unit L2 norm per example."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """``mean((a(f_s) − a(f_t))²)`` after pooling the larger map to the smaller; teacher detached."""
    f_s, f_t = match_spatial(f_s, f_t.detach())
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method("at")
class AT(LayerPairsMethod):
    needs_maps = True

    def __init__(
        self,
        weight: float = 1000.0,
        p: float = 2.0,
        layers: str = "1:-1",
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature)
        if p <= 0:
            raise ValueError(f"method.p={p} must be > 0")
        self.p = p
        self.use_layers(layers)

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        feats_s, feats_t = feature_list(student), feature_list(teacher)
        return sum(at_loss(feats_s[i], feats_t[j], self.p) for i, j in self.pairs)
