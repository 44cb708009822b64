"""``nst``: Huang & Wang, *Like What You Like: Knowledge Distill via Neuron Selectivity Transfer*
(arXiv 1707.01219, 2017).

Formula (RepDistiller ``distiller_zoo/NST.py``): each channel's map, flattened over the positions and
L2-normalised, is one sample of a distribution; the term is the squared MMD between the student's
and the teacher's channel sets under the polynomial kernel ``k(x, y) = (xᵀy)²`` (the larger map first
average-pooled to the smaller), summed over the paired layers::

    f̂_c = f_c / ‖f_c‖                                     (per example, per channel)
    L_nst = Σ_layers mean k(f̂_t, f̂_t) + mean k(f̂_s, f̂_s) − 2 mean k(f̂_s, f̂_t)
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_nst

(means over the batch and all channel pairs; the teacher–teacher term carries no gradient.)

Defaults (RepDistiller ``train_student.py``: ``feat[1:-1]``; ``scripts/run_cifar_distill.sh``:
``-a 0 -b 50``): layers ``feat[1:-1]``, weight β = 50, γ = 1, α = 0.

Deviations from the paper: the kernel is the paper's polynomial one with d = 2, c = 0; where the
paper applies NST (which layers, and combined with KD) we did not verify and follow RepDistiller's
sum over ``feat[1:-1]`` without KD. Vectors (an MLP's layers) have no positions and are refused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdx.methods.base import register_method
from kdx.methods.feature_layers import feature_list, match_spatial
from kdx.methods.repdistiller import LayerPairsMethod
from kdx.models.base import ModelOutput


def channel_distributions(f: Tensor) -> Tensor:
    """(B, C, *S) → (B, C, ΠS), each channel's map L2-normalised over the positions."""
    return F.normalize(f.reshape(f.shape[0], f.shape[1], -1), dim=2)


def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``(a_i · b_j)²`` for every channel pair: (B, C_a, N), (B, C_b, N) → (B, C_a, C_b)."""
    return (a @ b.transpose(1, 2)).pow(2)


def nst_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Squared MMD of the channel sets under ``(xᵀy)²``; teacher detached."""
    f_s, f_t = match_spatial(f_s, f_t.detach())
    s, t = channel_distributions(f_s), channel_distributions(f_t)
    return (
        polynomial_kernel(t, t).mean() + polynomial_kernel(s, s).mean() - 2 * polynomial_kernel(s, t).mean()
    )


@register_method("nst")
class NST(LayerPairsMethod):
    needs_maps = True

    def __init__(
        self,
        weight: float = 50.0,
        layers: str = "1:-1",
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature)
        self.use_layers(layers)

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        feats_s, feats_t = feature_list(student), feature_list(teacher)
        return sum(nst_loss(feats_s[i], feats_t[j]) for i, j in self.pairs)
