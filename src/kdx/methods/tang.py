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

from kdx.methods.base import DistillationMethod, SoftTarget, Terms, check_kd_weights, soft_cross_entropy
from kdx.models.base import ModelOutput

# ---------------------------------------------------------------------------------------------
# Target construction (pure functions, shared with tests and diagnostics).


def class_similarity(weight: Tensor, center: bool = False) -> Tensor:
    """(K, K) cosine similarity of the rows of a classifier weight ``(K, D)``.

    ``center=True`` first subtracts the mean row: softmax is unchanged by adding one vector to every
    row, so the centred similarity ignores that direction.
    """
    w = weight.detach().float()
    if center:
        w = w - w.mean(0, keepdim=True)
    w = F.normalize(w, dim=1, eps=1e-12)
    return w @ w.T


def true_class_prob(logits: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(z/T)_y`` per example, shape ``(B,)``."""
    return F.softmax(logits.float() / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)


def _check_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"synthetic targets need at least 2 classes, got {num_classes}")


def uniform_rest_target(true_mass: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """``q_y = m``, every other class ``(1-m)/(K-1)``; ``true_mass`` is ``(B,)``."""
    _check_classes(num_classes)
    one_hot = F.one_hot(y, num_classes).to(true_mass.dtype)
    rest = ((1 - true_mass) / (num_classes - 1))[:, None]
    return one_hot * true_mass[:, None] + (1 - one_hot) * rest


def label_smoothing_target(y: Tensor, num_classes: int, epsilon: float) -> Tensor:
    """``q_y = 1-ε``, every other class ``ε/(K-1)`` (mass ε on the wrong classes only)."""
    return uniform_rest_target(torch.full(y.shape, 1.0 - epsilon, device=y.device), y, num_classes)


def similarity_rest_weights(similarity: Tensor, y: Tensor, tau: float) -> Tensor:
    """``softmax_{j≠y}(S[y, j]/τ)``: how class y's off-true-class mass is shared, zero at y. ``(B, K)``."""
    rows = similarity[y] / tau
    rows = rows.masked_fill(F.one_hot(y, similarity.shape[0]).bool(), float("-inf"))
    return F.softmax(rows, dim=-1)


def similarity_target(similarity: Tensor, y: Tensor, tau: float) -> Tensor:
    """``q = softmax(S[y]/τ)``: the synthetic teacher of ``kd_sim``."""
    return F.softmax(similarity[y] / tau, dim=-1)


def similarity_rest_target(true_mass: Tensor, similarity: Tensor, y: Tensor, tau: float) -> Tensor:
    """``q_y = m``, the rest ``(1-m)`` shared by ``softmax_{j≠y}(S[y, j]/τ)``."""
    _check_classes(similarity.shape[0])
    one_hot = F.one_hot(y, similarity.shape[0]).to(true_mass.dtype)
    rest = similarity_rest_weights(similarity, y, tau).to(true_mass.dtype)
    return one_hot * true_mass[:, None] + (1 - true_mass)[:, None] * rest


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
