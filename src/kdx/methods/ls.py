"""``ls``: label smoothing as a synthetic teacher, the "universe" level of Tang et al. (2020).

Paper: Tang, Shivanna, Zhao, Lin, Singh, Chi, Jain, *Understanding and Improving Knowledge
Distillation* (arXiv 2002.03532); label smoothing itself is Szegedy et al. (2016).
Formula: ``L = (1-α)·CE(z_s, y) + α·T²·KL(q ‖ softmax(z_s/T))`` with the same ``q`` for every
example of class y: ``q_y = 1-ε``, ``q_k = ε/(K-1)`` for k ≠ y. No teacher is read.
Defaults: α = 0.9, T = 4 (as ``kd``, so the family differs only in ``q``), ε = 0.1.
Deviations from the paper: the paper's LS baseline is ordinary label smoothing (we could not check
its α/T); we keep the family's (α, T) so that ``kd_pt`` with a uniform-off-true-class teacher equals
``ls`` with ε = 1-p_t,y. Classic LS is ``method.alpha=1 method.temperature=1`` (ε on the K-1 wrong
classes, where PyTorch's ``label_smoothing`` spreads ε over all K).
"""

from __future__ import annotations

from torch import Tensor

from kdx.methods.base import TeacherUse, register_method
from kdx.methods.tang import SyntheticTargetKD
from kdx.methods.tang_targets import label_smoothing_target


@register_method("ls")
class LabelSmoothing(SyntheticTargetKD):
    teacher_use = TeacherUse.NONE

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, epsilon: float = 0.1):
        super().__init__(alpha, temperature)
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"method.epsilon={epsilon} must lie in [0, 1)")
        self.epsilon = epsilon

    def targets(self, y: Tensor, teacher_logits: Tensor | None, num_classes: int) -> Tensor:
        return label_smoothing_target(y, num_classes, self.epsilon)
