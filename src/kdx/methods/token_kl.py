"""Token-level distillation of causal language models: one divergence per next-token distribution.

Methods (each ``method=<name>``), with ``p`` the teacher's and ``q`` the student's next-token
distribution at one position, both ``softmax(z / T)``:

* ``fkl`` — forward KL, ``KL(p ‖ q) = Σ p (log p − log q)``: word-level KD (Kim & Rush 2016, *Sequence-
  Level Knowledge Distillation*; Hinton et al.'s KD applied per token).
* ``rkl`` — reverse KL, ``KL(q ‖ p)``: the objective of MiniLLM (Gu et al. 2024). Deviation: MiniLLM
  optimises it over sequences with a policy gradient; here it is the token-level reverse KL on the
  data's (or, in ``gkd``, the student's) sequences, as in GKD and DistiLLM's baselines.
* ``jsd`` — generalised Jensen–Shannon divergence (Agarwal et al. 2024, *On-Policy Distillation of
  Language Models*, GKD), TRL's convention: ``m = β·p + (1 − β)·q``,
  ``JSD_β = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)``; ``β = 0`` is the forward KL ``KL(p ‖ q)`` and ``β = 1`` the
  reverse KL ``KL(q ‖ p)`` (TRL's ``generalized_jsd_loss`` special-cases both ends so; the formula
  itself tends to ``β·KL(p ‖ q)`` as β → 0 and ``(1 − β)·KL(q ‖ p)`` as β → 1). Default β = 0.5.
* ``skl`` — skew KL (Ko et al. 2024, DistiLLM): ``KL(p ‖ α·p + (1 − α)·q)``; ``srkl`` — skew reverse
  KL ``KL(q ‖ (1 − α)·p + α·q)``. α = 0 gives the plain KLs; default α = 0.1 (DistiLLM's).
* ``tvd`` — total variation ``½ Σ |p − q|``.
* ``gkd`` (:mod:`kdx.methods.token_onpolicy`) adds on-policy student samples to ``jsd``; ``seqkd``
  trains on teacher-generated sequences.

Loss: ``L = T²·D + ce_weight·CE(z_s, y)``; defaults T = 1, ``ce_weight = 0`` (pure distillation, as GKD).
Masking: a position whose target is ``-100`` (padding) is never read; ``prompt_tokens = P`` also skips
the targets of the first ``P`` tokens of each block (the prompt; positions ``0 .. P − 2``).
Averaging (``average``): ``token`` (default, TRL's ``batchmean``): the sum over all unmasked positions
of the batch divided by their number, so long rows weigh more; ``sequence``: each row's mean over its
unmasked positions, then the mean over rows with any.

A top-k teacher cache (``teacher.cache=topk``) hands these methods a sparse target
(:class:`~kdx.teacher_outputs.TopKTarget`: the teacher's top-k log-probs at T = 1 and the log of the
rest's mass). The divergence is then taken between the two distributions over ``k + 1`` bins (the k
tokens and "any other token", the student's mass of the other tokens summed): exactly the full
divergence when k covers the vocabulary, a lower bound otherwise (the data-processing inequality).
Temperature must then be 1 (the cached log-probs are at T = 1).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.methods.base import DistillationMethod, Terms, register_method
from kdx.models.base import ModelOutput

IGNORE_INDEX = -100
AVERAGES = ("token", "sequence")
# log-probabilities are floored here: a zero-probability bin (log p = −inf) then contributes 0 to every
# divergence, and neither the value nor its gradient meets inf − inf
LOG_FLOOR = -1e30


# ---------------------------------------------------------------------------------------------
# Divergences over the last axis, from log-probabilities (teacher log p, student log q); (…, V) -> (…)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ a (log a − log b)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 − w)·b)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return _kl(log_p, log_q)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return _kl(log_q, log_p)


def generalized_jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """TRL/GKD's JSD_β (see the module docstring); β = 0: KL(p ‖ q), β = 1: KL(q ‖ p)."""
    if beta <= 0:
        return forward_kl(log_p, log_q)
    if beta >= 1:
        return reverse_kl(log_p, log_q)
    log_m = _mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def skew_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """KL(p ‖ α·p + (1 − α)·q)."""
    return _kl(log_p, log_q if alpha <= 0 else _mix(log_p, log_q, alpha))


def skew_reverse_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """KL(q ‖ (1 − α)·p + α·q)."""
    return _kl(log_q, log_p if alpha <= 0 else _mix(log_q, log_p, alpha))


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


# ---------------------------------------------------------------------------------------------
# Masks, averaging, sparse targets


def target_mask(y: Tensor, prompt_tokens: int = 0) -> Tensor:
    """Positions whose target the loss reads: not ``-100``, and past the prompt's first ``prompt_tokens``
    tokens (their targets sit at positions ``0 .. prompt_tokens − 2``)."""
    mask = y != IGNORE_INDEX
    if prompt_tokens > 1:
        mask[:, : prompt_tokens - 1] = False
    return mask


def reduce_positions(values: Tensor, mask: Tensor, average: str) -> Tensor:
    """``values`` (B, L) over the ``mask``ed positions: per token or per sequence (module docstring)."""
    values = values.masked_fill(~mask, 0.0)  # whatever a masked position holds, it adds nothing
    if average == "token":
        return values.sum() / mask.sum().clamp_min(1)
    counts = mask.sum(-1)
    rows = counts > 0
    per_row = values.sum(-1) / counts.clamp_min(1)
    return per_row.sum() / rows.sum().clamp_min(1)


def sparse_bins(log_q: Tensor, target: Any) -> tuple[Tensor, Tensor]:
    """The teacher's and the student's log-probabilities over the ``k + 1`` bins of a top-k target: the
    k tokens, then every other token together."""
    ids = target.ids.long()
    student_top = log_q.gather(-1, ids)
    student_rest = torch.logsumexp(log_q.scatter(-1, ids, LOG_FLOOR), dim=-1, keepdim=True)
    teacher = torch.cat([target.logp.float(), target.rest.float().unsqueeze(-1)], dim=-1)
    return teacher.clamp_min(LOG_FLOOR), torch.cat([student_top, student_rest], dim=-1).clamp_min(LOG_FLOOR)


# ---------------------------------------------------------------------------------------------
# The methods


class TokenDistillation(DistillationMethod):
    """The common token-level step: the student's and the teacher's ``(B, L, V)`` logits on the batch's
    blocks, one divergence per unmasked position, averaged (module docstring). Subclasses define
    :meth:`divergence`."""

    token_level: ClassVar[bool] = True

    def __init__(
        self, temperature: float = 1.0, ce_weight: float = 0.0, average: str = "token", prompt_tokens: int = 0
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"method.temperature={temperature} must be > 0")
        if ce_weight < 0:
            raise ValueError(f"method.ce_weight={ce_weight} must be >= 0")
        if average not in AVERAGES:
            raise ValueError(f"method.average={average!r} must be one of {', '.join(AVERAGES)}")
        if prompt_tokens < 0:
            raise ValueError(f"method.prompt_tokens={prompt_tokens} must be >= 0")
        self.temperature, self.ce_weight = float(temperature), float(ce_weight)
        self.average, self.prompt_tokens = average, int(prompt_tokens)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        raise NotImplementedError

    def sparse_target_problem(self) -> str | None:
        if self.temperature != 1.0:
            return (
                f"the cached top-k log-probs are at temperature 1, and method.temperature={self.temperature}"
            )
        return None

    def per_position(self, student_logits: Tensor, teacher: ModelOutput) -> Tensor:
        """The divergence at every position, (B, L), times T²."""
        t = self.temperature
        scale = (lambda z: z) if t == 1.0 else (lambda z: z / t)  # T = 1: no pass over (B, L, V)
        log_q = F.log_softmax(scale(student_logits.float()), dim=-1)
        if teacher.topk is not None:
            log_p, log_q = sparse_bins(log_q, teacher.topk)
        else:
            log_p = F.log_softmax(scale(teacher.logits.detach().float()), dim=-1)  # the target only
        values = self.divergence(log_p, log_q)
        return values if t == 1.0 else values * (t * t)

    def token_loss(self, student_logits: Tensor, teacher: ModelOutput, y: Tensor, mask: Tensor) -> Terms:
        div = reduce_positions(self.per_position(student_logits, teacher), mask, self.average)
        terms = {"loss": div, "div": div}
        if self.ce_weight > 0:
            ce = F.cross_entropy(
                student_logits.flatten(0, -2).float(), y.flatten(), ignore_index=IGNORE_INDEX
            )
            terms = {"loss": div + self.ce_weight * ce, "div": div, "ce": ce}
        return terms

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        assert teacher is not None
        return self.token_loss(student.logits, teacher, y, target_mask(y, self.prompt_tokens))


@register_method("fkl")
class ForwardKL(TokenDistillation):
    def __init__(
        self, temperature: float = 1.0, ce_weight: float = 0.0, average: str = "token", prompt_tokens: int = 0
    ):
        super().__init__(temperature, ce_weight, average, prompt_tokens)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return forward_kl(log_p, log_q)


@register_method("rkl")
class ReverseKL(TokenDistillation):
    def __init__(
        self, temperature: float = 1.0, ce_weight: float = 0.0, average: str = "token", prompt_tokens: int = 0
    ):
        super().__init__(temperature, ce_weight, average, prompt_tokens)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return reverse_kl(log_p, log_q)


@register_method("jsd")
class GeneralizedJSD(TokenDistillation):
    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        average: str = "token",
        prompt_tokens: int = 0,
    ):
        super().__init__(temperature, ce_weight, average, prompt_tokens)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"method.beta={beta} must lie in [0, 1]")
        self.beta = float(beta)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return generalized_jsd(log_p, log_q, self.beta)


@register_method("skl")
class SkewKL(TokenDistillation):
    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        average: str = "token",
        prompt_tokens: int = 0,
    ):
        super().__init__(temperature, ce_weight, average, prompt_tokens)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"method.alpha={alpha} must lie in [0, 1)")
        self.alpha = float(alpha)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return skew_kl(log_p, log_q, self.alpha)


@register_method("srkl")
class SkewReverseKL(TokenDistillation):
    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        average: str = "token",
        prompt_tokens: int = 0,
    ):
        super().__init__(temperature, ce_weight, average, prompt_tokens)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"method.alpha={alpha} must lie in [0, 1)")
        self.alpha = float(alpha)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return skew_reverse_kl(log_p, log_q, self.alpha)


@register_method("tvd")
class TotalVariation(TokenDistillation):
    def __init__(
        self, temperature: float = 1.0, ce_weight: float = 0.0, average: str = "token", prompt_tokens: int = 0
    ):
        super().__init__(temperature, ce_weight, average, prompt_tokens)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return total_variation(log_p, log_q)
