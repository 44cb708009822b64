"""``kd_sim``: KD from a synthetic teacher built from class similarity (Tang et al. 2020).

Paper: Tang, Shivanna, Zhao, Lin, Singh, Chi, Jain, *Understanding and Improving Knowledge
Distillation* (arXiv 2002.03532): universe + domain knowledge, no instance-specific knowledge.
Formula: ``L = (1-α)·CE(z_s, y) + α·T²·KL(q ‖ softmax(z_s/T))`` with ``q = softmax(S[y]/τ_s)``, where
``S = Ŵ_t Ŵ_tᵀ`` is the cosine similarity of the teacher's classifier weight vectors, computed once
in ``setup`` and kept as a buffer: every example of class y gets the same row. With ``true_mass`` m
set, ``q_y = m`` and the rest ``(1-m)·softmax_{j≠y}(S[y,j]/τ_s)`` (an ``ls`` whose ε follows S).
Defaults: α = 0.9, T = 4 (as ``kd``), τ_s = 0.25, true_mass = null.
Deviations from the paper: the synthetic-teacher form is from memory, not a source, and the paper's
τ_s is unknown; q is used as is (T softens the student only); the teacher is never run per batch.
Our τ_s = 0.25 makes q_y ≈ 0.84 for the MNIST-1D CNN teacher (10 classes), matching that teacher's
mean p_t,y at T = 4 (0.85), so kd_sim and kd differ in class relations, not in smoothing; q_y falls
as K grows (about 0.35 for 100 near-orthogonal classes): lower τ_s or pin ``true_mass`` there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdx.context import StepContext
from kdx.methods.base import register_method
from kdx.methods.tang import TeacherSimilarity, check_tau
from kdx.methods.tang_targets import similarity_rest_target, similarity_target


@register_method("kd_sim")
class KDSimilarity(TeacherSimilarity):
    def __init__(
        self,
        alpha: float = 0.9,
        temperature: float = 4.0,
        sim_temperature: float = 0.25,
        true_mass: float | None = None,
    ):
        super().__init__(alpha, temperature)
        check_tau(sim_temperature)
        if true_mass is not None and not 0.0 < true_mass <= 1.0:
            raise ValueError(f"method.true_mass={true_mass} must lie in (0, 1] (or null: from S)")
        self.sim_temperature = sim_temperature
        self.true_mass = true_mass

    def teacher_forward(self, ctx: StepContext, x: Tensor) -> None:
        return None  # the targets depend on the label only

    def targets(self, y: Tensor, teacher_logits: Tensor | None, num_classes: int) -> Tensor:
        similarity = self._similarity()
        if self.true_mass is None:
            return similarity_target(similarity, y, self.sim_temperature)
        mass = torch.full(y.shape, self.true_mass, device=y.device)
        return similarity_rest_target(mass, similarity, y, self.sim_temperature)
