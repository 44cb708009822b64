"""``pkt``: Passalis & Tefas, *Learning Deep Representations with Probabilistic Knowledge Transfer*
(ECCV 2018).

Formula (RepDistiller ``distiller_zoo/PKT.py``, code from the authors): cosine similarities of the
L2-normalised embeddings in the batch, mapped to [0, 1], each row turned into a conditional
distribution; the term is the KL divergence of the student's from the teacher's, averaged over all
B² entries (so ``1/B`` of the per-row KL)::

    K_ij = (1 + cos(e_i, e_j)) / 2,   P_ij = K_ij / Σ_k K_ik
    L_pkt = mean_{i,j} P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε))
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_pkt

The normalisation divides by ``‖e‖ + ε`` and zeroes NaNs, as the reference does.

Defaults (RepDistiller ``train_student.py``: ``feat[-1]``; ``scripts/run_cifar_distill.sh``:
``-a 0 -b 30000``): the embeddings, ε = 1e-7, weight β = 30000, γ = 1, α = 0.

Deviations from the paper: the paper also allows other kernels (e.g. a T-student kernel); the
cosine kernel above is the authors' default and RepDistiller's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdx.methods.base import register_method
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import EMBEDDING, LOGITS, ModelOutput


def cosine_conditional(e: Tensor, eps: float = 1e-7) -> Tensor:
    """``P_ij = K_ij / Σ_k K_ik`` with ``K = (1 + cos)/2``: rows are conditional distributions."""
    unit = e / (e.norm(dim=1, keepdim=True) + eps)
    unit = torch.nan_to_num(unit, nan=0.0)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


def pkt_loss(e_s: Tensor, e_t: Tensor, eps: float = 1e-7) -> Tensor:
    """``mean_ij P^t_ij log((P^t_ij + ε)/(P^s_ij + ε))``; the teacher side is detached."""
    p_s = cosine_conditional(e_s.flatten(1), eps)
    p_t = cosine_conditional(e_t.detach().flatten(1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_method("pkt")
class PKT(RepDistillerMethod):
    reads = frozenset({LOGITS, EMBEDDING})

    def __init__(
        self,
        weight: float = 30000.0,
        eps: float = 1e-7,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature)
        if eps <= 0:
            raise ValueError(f"method.eps={eps} must be > 0")
        self.eps = eps
        self._ready = True  # nothing to size

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return pkt_loss(student.embedding, teacher.embedding, self.eps)
