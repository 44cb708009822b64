"""``kd_pt``: KD from a "partial teacher" (Tang et al. 2020): the teacher's true-class confidence only.

Paper: Tang, Shivanna, Zhao, Lin, Singh, Chi, Jain, *Understanding and Improving Knowledge
Distillation* (arXiv 2002.03532): universe + instance-specific knowledge, no class relationships.
Formula: ``L = (1-α)·CE(z_s, y) + α·T²·KL(q ‖ softmax(z_s/T))`` with, per example,
``q_y = p_t,y = softmax(z_t/T')_y`` and ``q_k = (1-p_t,y)/(K-1)`` for k ≠ y.
Defaults: α = 0.9, T = 4 (as ``kd``); ``target_temperature`` T' = null, meaning T' = T.
Deviations from the paper: the variant's exact form and the temperature at which the paper reads
p_t,y are from memory, not a source; we read p_t,y at T' = T (so ``kd_pt`` is ``kd`` with the
teacher's off-true-class mass made uniform) and apply T to the student only through the KL term;
``method.target_temperature=1`` reads the teacher's plain confidence instead.
"""

from __future__ import annotations

from torch import Tensor

from kdx.methods.base import register_method
from kdx.methods.tang import SyntheticTargetKD
from kdx.methods.tang_targets import true_class_prob, uniform_rest_target


@register_method("kd_pt")
class KDPartialTeacher(SyntheticTargetKD):
    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, target_temperature: float | None = None):
        super().__init__(alpha, temperature)
        if target_temperature is not None and target_temperature <= 0:
            raise ValueError(
                f"method.target_temperature={target_temperature} must be > 0 (or null: = temperature)"
            )
        self.target_temperature = target_temperature

    def targets(self, y: Tensor, teacher_logits: Tensor | None, num_classes: int) -> Tensor:
        t = self.target_temperature or self.temperature
        return uniform_rest_target(true_class_prob(teacher_logits, y, t), y, num_classes)
