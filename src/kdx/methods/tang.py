"""Shared math of Tang et al.'s synthetic-teacher family (``ls``, ``kd_pt``, ``kd_sim``, ``kd_pt_sim``).

Tang, Shivanna, Zhao, Lin, Singh, Chi, Jain, *Understanding and Improving Knowledge Distillation*
(arXiv 2002.03532). The paper splits what a teacher passes on into three levels: the "universe"
(label smoothing), the "domain" (class relationships, read from the teacher's logit-layer geometry)
and the "instance" (the teacher's confidence on the true class rescales each example's gradient).
Each method of the family keeps some levels and drops the others by building a per-example target
distribution ``q`` (shape ``(B, K)``), then trains the student with the loss of :mod:`kd`:

    L = (1-α)·CE(z_s, y) + α·T²·KL(q ‖ softmax(z_s/T))          (batchmean, as in ``kd``)

| method      | q_y (true class)      | q_k, k≠y (the rest)                                  | levels kept        |
|-------------|-----------------------|------------------------------------------------------|--------------------|
| ``ls``      | 1-ε                   | ε/(K-1)                                              | universe           |
| ``kd_pt``   | p_t,y(x)              | (1-p_t,y(x))/(K-1)                                   | universe, instance |
| ``kd_sim``  | softmax(S[y]/τ_s)_y   | softmax(S[y]/τ_s)_k                                  | universe, domain   |
| ``kd_pt_sim``| p_t,y(x)             | (1-p_t,y(x))·softmax_{j≠y}(S[y,j]/τ_s)_k             | all three          |

``p_t,y(x) = softmax(z_t/T')_y`` is the teacher's probability on the true class at the target
temperature ``T'`` (default ``T' = T``, so that ``kd_pt`` is exactly ``kd`` with the teacher's
off-true-class mass flattened); ``S = Ŵ Ŵᵀ`` is the cosine similarity of the teacher's classifier
weight vectors (rows of ``teacher.classifier.weight``), computed once in ``setup`` and kept as a
buffer.

Gradient (why the family isolates the levels): ``∂/∂z_k [T²·KL(q ‖ softmax(z/T))] = T·(p^T_k − q_k)``
and ``∂CE/∂z_k = p_k − 1[k=y]``; on the true logit the distillation term pulls towards ``q_y``, so a
per-example ``q_y`` (``kd_pt``) re-weights examples, and the off-true-class part of ``q`` is the only
place class relationships enter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.losses import check_kd_weights, soft_cross_entropy
from kdx.methods.base import DistillationMethod, SoftTarget, Terms
from kdx.methods.tang_targets import class_similarity
from kdx.models.base import ModelOutput

# ---------------------------------------------------------------------------------------------
# The family's common loss.


class SyntheticTargetKD(DistillationMethod):
    """``(1-α)·CE + α·T²·KL(q ‖ softmax(z_s/T))`` with ``q`` from :meth:`targets`."""

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0):
        super().__init__()
        check_kd_weights(alpha, temperature)
        self.alpha = alpha
        self.temperature = temperature

    def targets(self, y: Tensor, teacher_logits: Tensor | None, num_classes: int) -> Tensor:
        """The per-example target distribution ``q``, ``(B, K)``, rows summing to 1."""
        raise NotImplementedError

    def soft_target(self) -> SoftTarget:
        """The family's own q, so the diagnostics' gradient ratio is the gradient the student gets;
        the diagnostics are on by default for the family (``callbacks.diagnostics.enabled=auto``)."""
        return SoftTarget(self.temperature, self.targets, diagnostics_by_default=True)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        logits = student.logits
        q = self.targets(y, None if teacher is None else teacher.logits, logits.shape[1]).to(logits.dtype)
        ce = F.cross_entropy(logits, y)
        kd = soft_cross_entropy(logits, q.detach(), self.temperature)
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd, "ce": ce, "kd": kd}


def check_tau(tau: float, name: str = "sim_temperature") -> None:
    if tau <= 0:
        raise ValueError(f"method.{name}={tau} must be > 0")


class TeacherSimilarity(SyntheticTargetKD):
    """Adds the ``similarity`` buffer (teacher's class cosine similarity), filled in ``setup``.

    The buffer is persistent (checkpoints carry it) but its size is only known in ``setup``; loading
    a checkpoint into a method that was never set up (``kdx-eval``) resizes it first.
    """

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0):
        super().__init__(alpha, temperature)
        self.register_buffer("similarity", torch.empty(0, 0))

    def setup(self, student: nn.Module, teacher: nn.Module | None, datamodule: Any) -> None:
        if teacher is None:
            raise ValueError(
                f"method '{self.name}' builds its targets from the teacher's classifier; "
                "pick a teacher (e.g. teacher=cnn1d)"
            )
        weight = teacher.classifier.weight
        self.similarity = class_similarity(weight).to(weight.device)

    def _similarity(self) -> Tensor:
        if self.similarity.numel() == 0:
            raise RuntimeError(
                f"method '{self.name}': the class similarity is empty; "
                "call setup(student, teacher, datamodule) first"
            )
        return self.similarity

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "similarity")
        if incoming is not None and incoming.shape != self.similarity.shape:
            self.similarity = torch.empty_like(incoming, device=self.similarity.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
