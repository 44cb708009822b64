"""Golden values of the token-level divergences, their masking and averaging, the JSD limits, the sparse
(top-k) target, and the on-policy coin of ``gkd``.

The hand-computed pair, a two-token vocabulary: teacher ``p = (1/2, 1/2)``, student ``q = (1/4, 3/4)``.

* KL(p ‖ q) = ½ ln(½ / ¼) + ½ ln(½ / ¾) = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3)
* KL(q ‖ p) = ¼ ln(¼ / ½) + ¾ ln(¾ / ½) = −¼ ln 2 + ¾ ln(3/2)
* m = ½p + ½q = (3/8, 5/8):  KL(p ‖ m) = ½ ln(4/3) + ½ ln(4/5) = ½ ln(16/15),
  KL(q ‖ m) = ¼ ln(2/3) + ¾ ln(6/5);  JSD_½ = ½ KL(p ‖ m) + ½ KL(q ‖ m)
* skew KL, α = ½: KL(p ‖ ½p + ½q) = KL(p ‖ m); skew reverse KL, α = ½: KL(q ‖ ½p + ½q) = KL(q ‖ m)
* TV = ½ (|½ − ¼| + |½ − ¾|) = ¼
"""

from __future__ import annotations

import math

import pytest
import torch

from kdx.context import StepContext
from kdx.methods.base import METHODS
from kdx.methods.token_kl import (
    forward_kl,
    generalized_jsd,
    reduce_positions,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    target_mask,
    total_variation,
)
from kdx.models.adapter import as_feature_model
from kdx.models.base import ModelOutput
from kdx.models.causal_lm import causal_lm
from kdx.teacher_outputs import topk_target

P = torch.tensor([0.5, 0.5]).log()
Q = torch.tensor([0.25, 0.75]).log()
FKL = 0.5 * math.log(4 / 3)
RKL = -0.25 * math.log(2) + 0.75 * math.log(1.5)
KL_PM = 0.5 * math.log(16 / 15)
KL_QM = 0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (forward_kl, FKL),
        (reverse_kl, RKL),
        (lambda p, q: generalized_jsd(p, q, 0.5), 0.5 * KL_PM + 0.5 * KL_QM),
        (lambda p, q: skew_kl(p, q, 0.5), KL_PM),
        (lambda p, q: skew_reverse_kl(p, q, 0.5), KL_QM),
        (total_variation, 0.25),
    ],
    ids=["fkl", "rkl", "jsd", "skl", "srkl", "tvd"],
)
def test_divergences_match_the_hand_computed_values(fn, expected):
    assert float(fn(P, Q)) == pytest.approx(expected, rel=1e-6)


def test_the_jsd_ends_are_the_two_kls_and_the_formula_tends_to_them():
    # TRL's convention: β = 0 is KL(teacher ‖ student), β = 1 is KL(student ‖ teacher)
    assert float(generalized_jsd(P, Q, 0.0)) == pytest.approx(FKL, rel=1e-6)
    assert float(generalized_jsd(P, Q, 1.0)) == pytest.approx(RKL, rel=1e-6)
    # the mixture formula itself: JSD_β ≈ β·KL(p ‖ q) near 0 and (1 − β)·KL(q ‖ p) near 1
    p64, q64 = P.double(), Q.double()
    assert float(generalized_jsd(p64, q64, 1e-5)) / 1e-5 == pytest.approx(FKL, rel=1e-3)
    assert float(generalized_jsd(p64, q64, 1 - 1e-5)) / 1e-5 == pytest.approx(RKL, rel=1e-3)


def test_skew_at_zero_is_the_plain_kl():
    assert float(skew_kl(P, Q, 0.0)) == pytest.approx(FKL, rel=1e-6)
    assert float(skew_reverse_kl(P, Q, 0.0)) == pytest.approx(RKL, rel=1e-6)


def test_token_and_sequence_averaging_and_masks():
    values = torch.tensor([[1.0, 2.0], [3.0, 99.0]])
    y = torch.tensor([[5, 6], [7, -100]])  # the 99 sits on padding
    mask = target_mask(y)
    assert float(reduce_positions(values, mask, "token")) == pytest.approx((1 + 2 + 3) / 3)
    assert float(reduce_positions(values, mask, "sequence")) == pytest.approx(((1 + 2) / 2 + 3) / 2)
    # a prompt of 2 tokens: the target at position 0 (token 1) is the prompt's
    prompt = target_mask(y, prompt_tokens=2)
    assert prompt.tolist() == [[False, True], [False, False]]
    assert float(reduce_positions(values, prompt, "token")) == pytest.approx(2.0)
    # a row with nothing left counts for nothing in the per-sequence mean
    assert float(reduce_positions(values, prompt, "sequence")) == pytest.approx(2.0)


def test_the_method_applies_temperature_and_masks_padding():
    # logits T·log p and T·log q give softmax(z / T) = p and q: the loss is T²·KL(p ‖ q) per position
    t = 2.0
    student = (t * Q).expand(1, 3, 2).clone()
    teacher = (t * P).expand(1, 3, 2).clone()
    teacher[0, 2] = torch.tensor([9.0, -9.0])  # a padded position, which must not count
    y = torch.tensor([[0, 1, -100]])
    method = METHODS["fkl"](temperature=t)
    terms = method.loss(ModelOutput(student), ModelOutput(teacher), y, torch.zeros(1))
    assert float(terms["loss"]) == pytest.approx(t * t * FKL, rel=1e-5)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"])
def test_a_topk_target_covering_the_vocabulary_gives_the_live_loss(name):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 3
    y = torch.randint(0, 11, (2, 5))
    y[1, 3:] = -100
    method = METHODS[name]()
    live = method.loss(ModelOutput(student), ModelOutput(teacher), y, torch.zeros(2))["loss"]
    sparse = ModelOutput(None, topk=topk_target(teacher, 11))  # type: ignore[arg-type]
    cached = method.loss(ModelOutput(student), sparse, y, torch.zeros(2))["loss"]
    assert float(cached) == pytest.approx(float(live), rel=1e-5, abs=1e-7)
    # fewer tokens: the divergence over k + 1 bins is a lower bound (data-processing inequality)
    if name in ("fkl", "rkl", "jsd", "skl", "srkl", "tvd"):
        coarse = method.loss(ModelOutput(student), ModelOutput(None, topk=topk_target(teacher, 3)), y, None)  # type: ignore[arg-type]
        assert float(coarse["loss"]) <= float(live) + 1e-6


def test_gradient_reaches_the_student_logits_only():
    student = torch.randn(1, 4, 6, requires_grad=True)
    teacher = torch.randn(1, 4, 6, requires_grad=True)
    loss = METHODS["jsd"]().loss(
        ModelOutput(student), ModelOutput(teacher), torch.zeros(1, 4, dtype=torch.long), None
    )
    loss["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_hyper_parameters_out_of_range_are_refused():
    with pytest.raises(ValueError, match="beta"):
        METHODS["jsd"](beta=1.5)
    with pytest.raises(ValueError, match="average"):
        METHODS["fkl"](average="batch")
    with pytest.raises(ValueError, match="alpha"):
        METHODS["skl"](alpha=1.0)
    with pytest.raises(ValueError, match="prompt_tokens"):
        METHODS["gkd"](prompt_tokens=0)


def _tiny_lm(width: int, seed: int):
    torch.manual_seed(seed)
    config = {"model_type": "gpt2", "n_embd": width, "n_layer": 1, "n_head": 2, "n_positions": 16}
    config |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return as_feature_model(causal_lm(config=config, vocab_size=12))


@pytest.mark.parametrize(("lmbda", "expected"), [(0.0, 0), (1.0, 6)])
def test_on_policy_coin_never_or_always_samples(lmbda, expected):
    student, teacher = _tiny_lm(8, 0), _tiny_lm(16, 1)
    method = METHODS["gkd"](lmbda=lmbda, prompt_tokens=3)
    ids = torch.randint(0, 12, (2, 7))
    x, y = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 12, (2, 7))
    flags = [
        float(
            method.training_step(
                (x, y, torch.arange(2)), StepContext(student=student, teacher=teacher, step=i)
            )["on_policy"]
        )
        for i in range(6)
    ]
    assert method.generated == expected and flags == [float(expected > 0)] * 6


def test_on_policy_samples_keep_the_prompt_and_repeat_with_the_seed():
    student = _tiny_lm(8, 0)
    method = METHODS["gkd"](lmbda=1.0, prompt_tokens=3)
    ids = torch.randint(0, 12, (2, 7))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ctx = StepContext(student=student, step=4)
    (a, ya), (b, _) = method._generate(student, x, ctx), method._generate(student, x, ctx)
    assert torch.equal(a["input_ids"], b["input_ids"])  # the same (seed, step): the same draw
    assert torch.equal(a["input_ids"][:, :3], ids[:, :3]) and a["input_ids"].shape == ids.shape
    assert torch.equal(a["input_ids"][:, 1:], ya[:, :-1])  # y is x shifted by one
    other = method._generate(student, x, StepContext(student=student, step=5))[0]
    assert not torch.equal(other["input_ids"], a["input_ids"])


def test_seqkd_trains_on_the_teachers_greedy_continuation():
    student, teacher = _tiny_lm(8, 0), _tiny_lm(16, 1)
    method = METHODS["seqkd"](prompt_tokens=2)
    ids = torch.randint(0, 12, (2, 6))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    terms = method.training_step((x, ids, torch.arange(2)), StepContext(student=student, teacher=teacher))
    assert method.generated == 1 and torch.isfinite(terms["loss"])
    greedy = teacher.sample(ids[:, :2], 5, torch.Generator(), temperature=0.0)
    logits = teacher(greedy[:, :-1]).logits
    assert torch.equal(logits[:, 1:].argmax(-1), greedy[:, 2:])  # greedy: each token is the argmax
