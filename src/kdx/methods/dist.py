"""``dist``: Huang, You, Wang, Qian & Xu, *Knowledge Distillation from A Stronger Teacher*
(NeurIPS 2022; official code hunto/DIST_KD, loss in hunto/image_classification_sota
``lib/models/losses/dist_kd.py``).

Relations instead of exact probabilities. With ``Y = softmax(Z/τ)`` (B × K) for student and
teacher and the Pearson correlation ``ρ(u, v) = cos(u − ū, v − v̄)`` (ε = 1e-8 in the
denominator)::

    inter = 1 − mean over examples i of ρ(Y_s[i, :], Y_t[i, :])     (each row: the class ranking)
    intra = 1 − mean over classes  c of ρ(Y_s[:, c], Y_t[:, c])     (each column: across the batch)
    L = ce_weight·CE + weight·τ²·(β·inter + γ·intra)

Defaults (official CIFAR-100 config ``configs/strategies/distill/dist_cifar.yaml``: ``kd: dist_t4``,
``ori_loss_weight: 1``, ``kd_loss_weight: 2``; ``DIST(beta=1, gamma=1, tau=4)``): τ = 4, β = γ = 1,
weight 2, CE weight 1. (The ImageNet config uses τ = 1, ``kd: dist``.)

Deviations from the paper: none; the loss is the official one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdx.errors import HyperParameterError
from kdx.methods.base import DistillationMethod, Terms, register_method
from kdx.models.base import ModelOutput

EPS = 1e-8  # the official cosine_similarity's eps


def pearson_rows(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: ``(N, M) → (N,)``."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    return 1 - pearson_rows(p_s, p_t).mean()


def intra_class_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    return inter_class_relation(p_s.t(), p_t.t())


@register_method("dist")
class DIST(DistillationMethod):
    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 4.0,
        weight: float = 2.0,
        ce_weight: float = 1.0,
    ):
        super().__init__()
        if beta < 0 or gamma < 0 or weight < 0 or ce_weight < 0:
            raise HyperParameterError(
                "method.beta, method.gamma, method.weight and method.ce_weight must be >= 0"
            )
        if temperature <= 0:
            raise HyperParameterError(f"method.temperature={temperature} must be > 0")
        self.beta, self.gamma, self.temperature = beta, gamma, temperature
        self.weight, self.ce_weight = weight, ce_weight

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        ce = F.cross_entropy(student.logits, y)
        p_s = F.softmax(student.logits / self.temperature, dim=1)
        p_t = F.softmax(teacher.logits / self.temperature, dim=1)
        inter = self.temperature**2 * inter_class_relation(p_s, p_t)
        intra = self.temperature**2 * intra_class_relation(p_s, p_t)
        dist = self.weight * (self.beta * inter + self.gamma * intra)
        return {"loss": self.ce_weight * ce + dist, "ce": ce, "inter": inter, "intra": intra}
