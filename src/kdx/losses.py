"""Loss pieces shared by the methods, the callbacks and the metrics (pure functions of tensors)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def per_sample_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(z_t/T) ‖ softmax(z_s/T))`` per example, shape ``(B,)``, without a T² factor.

    Written as ``Σ p_t (log p_t − log p_s)`` with both logs from ``log_softmax``: when the two
    logit vectors are equal the value is exactly 0, and so is its gradient through both sides.
    """
    log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def check_kd_weights(alpha: float, temperature: float) -> None:
    """The checks every ``(1-α)·CE + α·T²·KL`` method makes on its two weights."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"method.alpha={alpha} must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"method.temperature={temperature} must be > 0")


def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(q ‖ softmax(z_s/T))`` with batchmean reduction (the RepDistiller scaling)."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_p, target_probs, reduction="batchmean") * temperature**2


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, batchmean."""
    return soft_cross_entropy(student_logits, F.softmax(teacher_logits / temperature, dim=-1), temperature)
