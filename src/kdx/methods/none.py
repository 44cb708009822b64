"""``none``: the student alone, cross-entropy on the labels (also how teachers are trained).

Formula: ``L = CE(z_s, y)`` (optionally with label smoothing ε, PyTorch's definition). On a causal
LM's per-position logits (B, L, V) it is the mean next-token cross-entropy over the positions whose
target is not ``-100`` (padding).
Defaults: ε = 0.
Deviations from the paper: none (no paper).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdx.methods.base import DistillationMethod, TeacherUse, Terms, register_method
from kdx.models.base import ModelOutput


@register_method("none")
class NoDistillation(DistillationMethod):
    teacher_use = TeacherUse.NONE

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        logits = student.logits
        if logits.dim() == 3:  # a causal LM: every position predicts its next token
            logits, y = logits.flatten(0, 1), y.flatten()
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing, ignore_index=-100)
        return {"loss": ce, "ce": ce}
