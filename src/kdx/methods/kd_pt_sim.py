"""``kd_pt_sim``: partial teacher + class similarity (Tang et al. 2020), all three levels, synthetically.

Paper: Tang, Shivanna, Zhao, Lin, Singh, Chi, Jain, *Understanding and Improving Knowledge
Distillation* (arXiv 2002.03532).
Formula: ``L = (1-α)·CE(z_s, y) + α·T²·KL(q ‖ softmax(z_s/T))`` with, per example,
``q_y = p_t,y = softmax(z_t/T')_y`` and ``q_k = (1-p_t,y)·softmax_{j≠y}(S[y,j]/τ_s)_k`` for k ≠ y;
``S`` is the cosine similarity of the teacher's classifier weight vectors (buffer, from ``setup``).
Defaults: α = 0.9, T = 4 (as ``kd``), ``target_temperature`` T' = null (= T), τ_s = 0.25.
Deviations from the paper: the form is from memory, not a source. The note we work from says the
off-true-class mass is spread "in proportion to S[y,k]", but cosines can be negative, so we spread
it by a softmax of S[y,·]/τ_s over the wrong classes; p_t,y is read at T' = T (as in ``kd_pt``).
"""

from __future__ import annotations

from torch import Tensor

from kdx.methods.base import register_method
from kdx.methods.tang import TeacherSimilarity, check_tau
from kdx.methods.tang_targets import similarity_rest_target, true_class_prob


@register_method("kd_pt_sim")
class KDPartialTeacherSimilarity(TeacherSimilarity):
    def __init__(
        self,
        alpha: float = 0.9,
        temperature: float = 4.0,
        target_temperature: float | None = None,
        sim_temperature: float = 0.25,
    ):
        super().__init__(alpha, temperature)
        check_tau(sim_temperature)
        if target_temperature is not None and target_temperature <= 0:
            raise ValueError(
                f"method.target_temperature={target_temperature} must be > 0 (or null: = temperature)"
            )
        self.target_temperature = target_temperature
        self.sim_temperature = sim_temperature

    def targets(self, y: Tensor, teacher_logits: Tensor | None, num_classes: int) -> Tensor:
        t = self.target_temperature or self.temperature
        mass = true_class_prob(teacher_logits, y, t)
        return similarity_rest_target(mass, self._similarity(), y, self.sim_temperature)
