"""``rkd``: Park, Kim, Lu & Cho, *Relational Knowledge Distillation* (CVPR 2019).

Formula (RepDistiller ``distiller_zoo/RKD.py``): on the flattened embeddings of a batch, a distance
term (pairwise Euclidean distances, each side divided by its mean over the non-zero distances) and
an angle term (cosines of the angle at every example j between the directions to i and to k), both
compared by smooth-L1 (β = 1, mean over all entries, diagonal/degenerate entries included)::

    ψ_D(i, j) = ‖e_i − e_j‖ / μ,       μ = mean of the non-zero ‖e_i − e_j‖
    ψ_A(i, j, k) = ⟨(e_i − e_j)/‖e_i − e_j‖, (e_k − e_j)/‖e_k − e_j‖⟩   (0 when a difference is 0)
    L_rkd = w_d · smoothL1(ψ_D^s, ψ_D^t) + w_a · smoothL1(ψ_A^s, ψ_A^t)
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_rkd

Defaults (RepDistiller ``RKDLoss(w_d=25, w_a=50)``, ``train_student.py``: ``feat[-1]``,
``scripts/run_cifar_distill.sh``: ``-a 0 -b 1``): the embeddings, distance_weight = 25,
angle_weight = 50, weight β = 1, γ = 1, α = 0.

Deviations from the paper: none known in the two terms (Huber loss on normalised distances and on
angle cosines); the weights 25 / 50 are RepDistiller's CIFAR-100 setting (the paper sets them per
task). The angle is taken at e_j between e_i and e_k, every ordered triple counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.methods.base import register_method
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import EMBEDDING, LOGITS, ModelOutput


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix (B, B) with an exact zero diagonal (squared distances clamped at eps)."""
    squared = e.pow(2).sum(1)
    d2 = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    off_diagonal = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt() * off_diagonal


def normalised_distances(e: Tensor) -> Tensor:
    """``ψ_D``: distances over their mean over the positive entries."""
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def angle_cosines(e: Tensor) -> Tensor:
    """``ψ_A`` flattened: for every (j, i, k) the cosine between e_i − e_j and e_k − e_j (B³ entries)."""
    directions = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i − e_j
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


def rkd_distance_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    with torch.no_grad():
        target = normalised_distances(e_t.flatten(1))
    return F.smooth_l1_loss(normalised_distances(e_s.flatten(1)), target)


def rkd_angle_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    with torch.no_grad():
        target = angle_cosines(e_t.flatten(1))
    return F.smooth_l1_loss(angle_cosines(e_s.flatten(1)), target)


@register_method("rkd")
class RKD(RepDistillerMethod):
    reads = frozenset({LOGITS, EMBEDDING})

    def __init__(
        self,
        weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature)
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError("method.distance_weight and method.angle_weight must be >= 0")
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self._ready = True  # nothing to size

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> dict[str, Tensor]:
        e_s, e_t = student.embedding, teacher.embedding.detach()
        distance, angle = rkd_distance_loss(e_s, e_t), rkd_angle_loss(e_s, e_t)
        return {
            "rkd": self.distance_weight * distance + self.angle_weight * angle,
            "rkd_distance": distance,
            "rkd_angle": angle,
        }
