"""Targets of Tang et al.'s synthetic-teacher family (pure functions, read by the methods in
:mod:`kdx.methods.tang` and by :mod:`kdx.diagnostics`), and the class similarity of a classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
