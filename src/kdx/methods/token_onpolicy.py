"""Distillation on generated sequences: ``gkd`` (on-policy student samples) and ``seqkd`` (teacher sequences).

``gkd`` — Agarwal et al. 2024, *On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes* (GKD). Formula: with probability λ (``lmbda``) a batch's blocks are replaced by
the student's own continuations of their prompts (the first ``prompt_tokens`` tokens, continued to the
block's length by sampling from the student at ``sample_temperature``, top ``top_k`` tokens; no
gradient through the sampling), the teacher scores those sequences, and the loss is the token-level
generalised JSD_β (:func:`kdx.methods.token_kl.generalized_jsd`, TRL's convention) over the
continuation's positions; otherwise (probability 1 − λ) it is JSD_β on the data's blocks.
Defaults: β = 0.5, λ = 0.5, sampling temperature 1, all tokens (TRL's GKDConfig: λ 0.5, β 0.5,
temperature 0.9). Deviations: none in the objective; the coin is one draw per batch from a
generator seeded by (run seed, step, rank) (:func:`kdx.seeding.key_seed`), so a run repeats its
choices, and λ = 0 never samples, λ = 1 always does.

``seqkd`` — Kim & Rush 2016, *Sequence-Level Knowledge Distillation*. Formula: the teacher continues
each block's prompt (greedy by default, ``sample_temperature = 0``), and the student is trained with
cross-entropy on the teacher's continuation. Deviations: greedy decoding instead of beam search
(beam 5 in the paper), and the sequences are generated for each batch during training rather than once
before it (the same prompts give the same greedy sequences, so only the cost differs).

Both need the live teacher (it scores, or writes, sequences no cache holds).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.context import StepContext
from kdx.methods.base import DistillationMethod, TeacherUse, Terms, register_method
from kdx.methods.token_kl import IGNORE_INDEX, TokenDistillation, generalized_jsd, target_mask
from kdx.seeding import key_seed

SALT_COIN, SALT_SAMPLE = 1, 2


def continuation(sequences: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """A generated ``(B, L + 1)`` sequence as a batch: ``x`` its first L tokens, ``y`` the next tokens."""
    x = sequences[:, :-1]
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}, sequences[:, 1:]


class _Generates:
    """Sampling settings and the seeded draws of a method that generates sequences."""

    prompt_tokens: int
    sample_temperature: float
    top_k: int

    def _check_sampling(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(
                f"method.prompt_tokens={self.prompt_tokens} must be >= 1 (the prompt to continue)"
            )
        if self.sample_temperature < 0 or self.top_k < 0:
            raise ValueError(
                "method.sample_temperature and method.top_k must be >= 0 (0: greedy / all tokens)"
            )

    def _generate(
        self, model: Any, x: dict[str, Tensor], ctx: StepContext
    ) -> tuple[dict[str, Tensor], Tensor]:
        ids = x["input_ids"]
        if ids.shape[1] <= self.prompt_tokens:
            raise ValueError(
                f"method.prompt_tokens={self.prompt_tokens} leaves nothing to generate in blocks of {ids.shape[1]}"
            )
        generator = torch.Generator(device=ids.device)
        generator.manual_seed(key_seed(torch.initial_seed(), ctx.step, ctx.rank, SALT_SAMPLE))
        new = ids.shape[1] + 1 - self.prompt_tokens  # x and y of a block cover L + 1 tokens
        sequences = model.sample(
            ids[:, : self.prompt_tokens],
            new,
            generator,
            temperature=self.sample_temperature,
            top_k=self.top_k,
        )
        self.generated += 1
        return continuation(sequences)


@register_method("gkd")
class GKD(_Generates, TokenDistillation):
    teacher_use = TeacherUse.LIVE
    live_reason: ClassVar[str] = "the teacher scores the student's own samples, which no cache holds"

    def __init__(
        self,
        beta: float = 0.5,
        lmbda: float = 0.5,
        prompt_tokens: int = 8,
        sample_temperature: float = 1.0,
        top_k: int = 0,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        average: str = "token",
    ):
        super().__init__(temperature, ce_weight, average, prompt_tokens)
        if not 0.0 <= beta <= 1.0 or not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"method.beta={beta} and method.lmbda={lmbda} must lie in [0, 1]")
        self.beta, self.lmbda = float(beta), float(lmbda)
        self.sample_temperature, self.top_k = float(sample_temperature), int(top_k)
        self._check_sampling()
        self.generated = 0  # batches whose sequences the student generated (this process)

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return generalized_jsd(log_p, log_q, self.beta)

    def on_policy(self, ctx: StepContext) -> bool:
        """This step's coin: True with probability λ, the same for the same (seed, step, rank)."""
        draw = random.Random(key_seed(torch.initial_seed(), ctx.step, ctx.rank, SALT_COIN)).random()
        return draw < self.lmbda

    def training_step(self, batch: tuple[Any, Tensor, Tensor], ctx: StepContext) -> Terms:
        x, y, index = batch
        sampled = self.on_policy(ctx)
        if sampled:
            x, y = self._generate(ctx.student, x, ctx)
        student_out = ctx.student(x, self.reads)
        with torch.no_grad():
            teacher_out = ctx.teacher(x, self.reads)
        terms = self.token_loss(student_out.logits, teacher_out, y, target_mask(y, self.prompt_tokens))
        terms["on_policy"] = torch.full((), float(sampled), device=terms["loss"].device)
        return terms


@register_method("seqkd")
class SequenceKD(_Generates, DistillationMethod):
    teacher_use = TeacherUse.LIVE
    live_reason: ClassVar[str] = "the teacher writes the training sequences during the step"
    token_level: ClassVar[bool] = True

    def __init__(self, prompt_tokens: int = 8, sample_temperature: float = 0.0, top_k: int = 0):
        super().__init__()
        self.prompt_tokens, self.sample_temperature, self.top_k = (
            int(prompt_tokens),
            float(sample_temperature),
            int(top_k),
        )
        self._check_sampling()
        self.generated = 0

    def training_step(self, batch: tuple[Any, Tensor, Tensor], ctx: StepContext) -> Terms:
        x, _, _ = batch
        x, y = self._generate(ctx.teacher, x, ctx)
        logits = ctx.student(x, self.reads).logits
        y = y.masked_fill(~target_mask(y, self.prompt_tokens), IGNORE_INDEX)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)
        return {"loss": ce, "ce": ce}
