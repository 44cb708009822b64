"""``logit_mse``: Ba & Caruana, *Do Deep Nets Really Need to be Deep?* (NeurIPS 2014).

Formula: ``L = (1-α)·CE(z_s, y) + α·MSE(z_s, z_t)``, the squared difference of the logits averaged
over classes and over the batch (no temperature: logits are matched directly).
Defaults: α = 0.5 (ours, an example value).
Deviations from the paper: the paper regresses the teacher's logits alone (α = 1, no label term);
we keep a cross-entropy term so that α = 0 is plain training.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdx.methods.base import DistillationMethod, Terms
from kdx.models.base import ModelOutput


class LogitMSE(DistillationMethod):
    # the name kdx's messages use (kdx's own methods get theirs from @register_method, which also
    # makes a typed config schema at import time, before any config is composed: too late for a
    # class that is imported only when the run instantiates it)
    name = "logit_mse"
    # `reads` (what the models compute for loss()) stays at its default: logits only

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            # a bad hyper-parameter is a ValueError from __init__ whose message names the key
            raise ValueError(f"method.alpha={alpha} must lie in [0, 1]")
        self.alpha = alpha

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        ce = F.cross_entropy(student.logits, y)
        mse = F.mse_loss(student.logits, teacher.logits)
        # every entry is logged as train/<key>; "loss" is the one that is optimised
        return {"loss": (1 - self.alpha) * ce + self.alpha * mse, "ce": ce, "mse": mse}
