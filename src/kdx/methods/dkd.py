"""``dkd``: Zhao, Cui, Song, Qiu & Liang, *Decoupled Knowledge Distillation* (CVPR 2022; official
code megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``).

Hinton KD split in two. With ``p = softmax(z/T)`` and the target class ``y``: the binary
distributions ``b = (p_y, 1 − p_y)`` (target vs the rest), and the distributions over the
non-target classes alone ``p̂ = softmax(z_{≠y}/T)``::

    TCKD = T²·KL(b_t ‖ b_s)                 NCKD = T²·KL(p̂_t ‖ p̂_s)       (batchmean)
    L = ce_weight·CE + min(epoch / warmup, 1)·(α·TCKD + β·NCKD)

(``KL(p_t ‖ p_s) = TCKD + (1 − p_t,y)·NCKD`` before the T² factor: DKD frees the NCKD weight from
the teacher's confidence.) ``epoch`` counts from 1 as in mdistiller's trainer, so the first epoch
already has the factor 1/warmup; ``warmup=0`` switches the ramp off.

Defaults (mdistiller ``engine/cfg.py``): α = 1, β = 8, T = 4, CE weight 1, warm-up 20 epochs.
mdistiller's per-pair CIFAR-100 configs (``configs/cifar100/dkd/*.yaml``) lower β: 2 for
resnet56→resnet20 and resnet110→resnet32, 6 for wrn-40-2→wrn-16-2 / wrn-40-1, vgg13→vgg8 and
vgg13→MobileNetV2; every other pair keeps 8. The CRD CIFAR-100 rows pin these under the method's own key
(``tuned: {dkd: {beta: X}}`` in ``conf/experiment/crd_cifar100/<pair>.yaml``).

Deviations from the paper: none. mdistiller removes the target class from the NCKD softmax by
subtracting 1000 from its logit; we mask it with −∞ (the same distribution, without the 1000
margin's assumption on the logits' range), and take log p_b from the two clamped binary
probabilities (mdistiller: log of the same sums, unclamped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.context import StepContext
from kdx.errors import HyperParameterError
from kdx.methods.base import DistillationMethod, Terms, register_method
from kdx.models.base import ModelOutput


def binary_probs(probs: Tensor, target_mask: Tensor) -> Tensor:
    """``(B, K)`` probabilities → ``(B, 2)``: the target class's mass and the rest."""
    target = (probs * target_mask).sum(1, keepdim=True)
    return torch.cat([target, (probs * ~target_mask).sum(1, keepdim=True)], dim=1)


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, y: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)``, each ``T²·KL`` with batchmean reduction."""
    mask = F.one_hot(y, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    b_s, b_t = binary_probs(p_s, mask), binary_probs(p_t, mask)
    tckd = F.kl_div(torch.log(b_s.clamp_min(1e-30)), b_t, reduction="batchmean") * temperature**2
    minus_inf = torch.finfo(student_logits.dtype).min
    log_q_s = F.log_softmax((student_logits / temperature).masked_fill(mask, minus_inf), dim=1)
    q_t = F.softmax((teacher_logits / temperature).masked_fill(mask, minus_inf), dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * temperature**2
    return tckd, nckd


def warmup_factor(epoch: int, warmup: int) -> float:
    """mdistiller's ``min(epoch / warmup, 1)`` with ``epoch`` counted from 1."""
    return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)


@register_method("dkd")
class DKD(DistillationMethod):
    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        warmup: int = 20,
    ):
        super().__init__()
        if alpha < 0 or beta < 0 or ce_weight < 0:
            raise HyperParameterError("method.alpha, method.beta and method.ce_weight must be >= 0")
        if temperature <= 0:
            raise HyperParameterError(f"method.temperature={temperature} must be > 0")
        if warmup < 0:
            raise HyperParameterError(f"method.warmup={warmup} must be >= 0 (0: no warm-up)")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup = ce_weight, warmup
        self.epoch = 0  # set by on_train_epoch_start

    def on_train_epoch_start(self, ctx: StepContext) -> None:
        self.epoch = ctx.epoch

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        ce = F.cross_entropy(student.logits, y)
        tckd, nckd = dkd_terms(student.logits, teacher.logits, y, self.temperature)
        ramp = warmup_factor(self.epoch, self.warmup)
        dkd = ramp * (self.alpha * tckd + self.beta * nckd)
        return {"loss": self.ce_weight * ce + dkd, "ce": ce, "tckd": tckd, "nckd": nckd, "dkd": dkd}
