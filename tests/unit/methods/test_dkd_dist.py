"""DKD and DIST: golden values by hand, the identities of their definitions, gradient flow, end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdx.context import StepContext
from kdx.losses import kd_loss
from kdx.methods.dist import DIST, inter_class_relation, intra_class_relation, pearson_rows
from kdx.methods.dkd import DKD, dkd_terms, warmup_factor
from kdx.models.base import ModelOutput


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax (T = 1) is exactly ``probs``."""
    return torch.tensor(probs).log()


# ---------------------------------------------------------------------------------------------
# DKD


def test_dkd_golden():
    # T = 1, y = 0. Student p_s = (1/3, 1/3, 1/3); teacher p_t = (1/5, 3/5, 1/5).
    #   binary: b_s = (1/3, 2/3), b_t = (1/5, 4/5)
    #   TCKD = 1/5·log((1/5)/(1/3)) + 4/5·log((4/5)/(2/3)) = 1/5·log(3/5) + 4/5·log(6/5)
    #   non-target (classes 1, 2): q_s = (1/2, 1/2), q_t = (3/4, 1/4)
    #   NCKD = 3/4·log(3/2) + 1/4·log(1/2)
    s, t, y = logits_of([[1 / 3, 1 / 3, 1 / 3]]), logits_of([[0.2, 0.6, 0.2]]), torch.tensor([0])
    tckd, nckd = dkd_terms(s, t, y, temperature=1.0)
    assert tckd.item() == pytest.approx(0.2 * math.log(0.6) + 0.8 * math.log(1.2), abs=1e-6)
    assert nckd.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    # at T = 2 both terms are T²·KL of the softened distributions: scaling every logit by 2 and
    # using T = 2 gives the same distributions, so each term is 4× the T = 1 value
    tckd2, nckd2 = dkd_terms(2 * s, 2 * t, y, temperature=2.0)
    assert tckd2.item() == pytest.approx(4 * tckd.item(), rel=1e-5)
    assert nckd2.item() == pytest.approx(4 * nckd.item(), rel=1e-5)


def test_kd_decomposes_into_tckd_plus_weighted_nckd():
    # the paper's Eq. (1): KL(p_t ‖ p_s) = TCKD + (1 − p_t,y)·NCKD, per example (B = 1 here)
    torch.manual_seed(0)
    for _ in range(3):
        s, t, y = torch.randn(1, 7), torch.randn(1, 7), torch.randint(0, 7, (1,))
        tckd, nckd = dkd_terms(s, t, y, temperature=3.0)
        p_t_target = F.softmax(t / 3.0, dim=1)[0, y].item()
        kd = kd_loss(s, t, 3.0)
        assert kd.item() == pytest.approx(tckd.item() + (1 - p_t_target) * nckd.item(), rel=1e-4)


def test_dkd_with_beta_zero_and_alpha_one_is_the_target_class_term_only():
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    method = DKD(alpha=1.0, beta=0.0, warmup=0)
    terms = method.loss(ModelOutput(s), ModelOutput(t), y, torch.arange(4))
    tckd, _ = dkd_terms(s, t, y, 4.0)
    assert (terms["loss"] - F.cross_entropy(s, y)).item() == pytest.approx(tckd.item(), rel=1e-6)
    # and with identical logits both terms vanish
    tckd, nckd = dkd_terms(s, s.clone(), y, 4.0)
    assert abs(tckd.item()) < 1e-6 and abs(nckd.item()) < 1e-6


def test_dkd_warm_up_ramps_the_weight_from_the_first_epoch():
    # mdistiller counts epochs from 1: epoch 0 here is its epoch 1 → 1/20
    assert warmup_factor(0, 20) == pytest.approx(1 / 20)
    assert warmup_factor(9, 20) == pytest.approx(0.5)
    assert warmup_factor(19, 20) == 1.0 and warmup_factor(100, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0
    torch.manual_seed(2)
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    method = DKD(warmup=20)
    method.on_train_epoch_start(StepContext(student=None, epoch=9))
    terms = method.loss(ModelOutput(s), ModelOutput(t), y, torch.arange(3))
    assert terms["dkd"].item() == pytest.approx(0.5 * (terms["tckd"] + 8 * terms["nckd"]).item(), rel=1e-6)


def test_dkd_bad_hyper_parameters():
    with pytest.raises(ValueError, match="warmup"):
        DKD(warmup=-1)
    with pytest.raises(ValueError, match="temperature"):
        DKD(temperature=0.0)


# ---------------------------------------------------------------------------------------------
# DIST


def test_pearson_golden():
    # (1, 2, 3) and (1, 3, 2): centred (−1, 0, 1) and (−1, 1, 0); dot 1, norms √2·√2 → ρ = 1/2
    assert pearson_rows(
        torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0]])
    ).item() == pytest.approx(0.5)


def test_dist_golden():
    # T = 1, so softmax(log p) = p.
    #   p_s = [[.2, .3, .5], [.5, .3, .2]],  p_t = [[.2, .5, .3], [.3, .5, .2]]
    # inter (rows): row 1 centred s = (−4, −1, 5)/30, t = (−4, 5, −1)/30: dot 6/900, norms² 42/900 → ρ = 1/7;
    #   row 2 likewise (5, −1, −4) vs (−1, 5, −4): ρ = 1/7 → inter = 1 − 1/7 = 6/7
    # intra (columns): col 0 (.2, .5) vs (.2, .3): ρ = 1; col 1 (.3, .3) is constant: ρ = 0/(0 + ε) = 0;
    #   col 2 (.5, .2) vs (.3, .2): ρ = 1 → intra = 1 − 2/3 = 1/3
    # L_DIST = weight·T²·(β·inter + γ·intra) = 2·(6/7 + 1/3) = 50/21
    p_s, p_t = [[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]], [[0.2, 0.5, 0.3], [0.3, 0.5, 0.2]]
    y = torch.tensor([2, 0])
    terms = DIST(temperature=1.0).loss(ModelOutput(logits_of(p_s)), ModelOutput(logits_of(p_t)), y, y)
    assert terms["inter"].item() == pytest.approx(6 / 7, abs=1e-5)
    assert terms["intra"].item() == pytest.approx(1 / 3, abs=1e-5)
    ce = F.cross_entropy(logits_of(p_s), y).item()  # = −(log .5 + log .5)/2 = log 2
    assert ce == pytest.approx(math.log(2), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(math.log(2) + 50 / 21, abs=1e-5)


def test_dist_identities():
    torch.manual_seed(3)
    z = torch.randn(6, 10) * 3
    p = F.softmax(z, dim=1)
    # identical predictions: both relations are perfect, the loss is 0 (up to ε)
    assert inter_class_relation(p, p.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert intra_class_relation(p, p.clone()).item() == pytest.approx(0.0, abs=1e-5)
    # Pearson is invariant to a positive affine map of either side; reversed sign gives ρ = −1
    assert inter_class_relation(3 * p + 1, p).item() == pytest.approx(0.0, abs=1e-5)
    assert inter_class_relation(-p, p).item() == pytest.approx(2.0, abs=1e-5)
    # the loss scales with τ² at fixed softened predictions
    y = torch.zeros(6, dtype=torch.long)
    a = DIST(temperature=2.0, weight=1.0, ce_weight=0.0).loss(ModelOutput(2 * z), ModelOutput(z), y, y)
    b = DIST(temperature=1.0, weight=1.0, ce_weight=0.0).loss(ModelOutput(z), ModelOutput(z / 2), y, y)
    assert a["loss"].item() == pytest.approx(4 * b["loss"].item(), rel=1e-5)


def test_dist_bad_hyper_parameters():
    with pytest.raises(ValueError, match="temperature"):
        DIST(temperature=-1.0)
    with pytest.raises(ValueError, match="beta"):
        DIST(beta=-1.0)


# ---------------------------------------------------------------------------------------------
# End to end on the CRD row (synthetic CIFAR)


def test_dkd_on_two_classes_stays_finite():
    # mdistiller #60: with two classes the non-target distribution has one class, so NCKD is
    # KL(1 ‖ 1) = 0; masking the target with -1000 there made it blow up. Large logits, both terms finite.
    torch.manual_seed(0)
    student = (30 * torch.randn(8, 2)).requires_grad_(True)
    teacher, y = 30 * torch.randn(8, 2), torch.tensor([0, 1] * 4)
    tckd, nckd = dkd_terms(student, teacher, y, 4.0)
    assert nckd.item() == 0.0 and torch.isfinite(tckd) and tckd.item() > 0
    (tckd + 8.0 * nckd).backward()
    assert torch.isfinite(student.grad).all()
