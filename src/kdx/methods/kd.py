"""``kd``: Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network* (2015).

Formula: ``L = (1-α)·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``, KL with batchmean
reduction (sum over classes, mean over the batch).
Defaults: T = 4, α = 0.9: the RepDistiller / CRD benchmark convention (``-r 0.1 -a 0.9``).
Deviations from the paper: the paper weights the soft term by T² but leaves α open; we follow
RepDistiller's fixed 0.1/0.9 split.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdx.losses import check_kd_weights, kd_loss
from kdx.methods.base import DistillationMethod, SoftTarget, Terms, hinton_target, register_method
from kdx.models.base import ModelOutput


@register_method("kd")
class KD(DistillationMethod):
    def __init__(self, alpha: float = 0.9, temperature: float = 4.0):
        super().__init__()
        check_kd_weights(alpha, temperature)
        self.alpha = alpha
        self.temperature = temperature

    def soft_target(self) -> SoftTarget:
        return SoftTarget(self.temperature, hinton_target(self.temperature))

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        ce = F.cross_entropy(student.logits, y)
        kd = kd_loss(student.logits, teacher.logits, self.temperature)
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd, "ce": ce, "kd": kd}
