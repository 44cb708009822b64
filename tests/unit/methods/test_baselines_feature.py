"""The RepDistiller feature/relation baselines: FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT,
FSP, NST. Hand-derived golden values, identities, gradient flow, pre-training phases, refusals, e2e."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdx.context import StepContext
from kdx.data.synthetic import SyntheticDataModule
from kdx.errors import KDXError
from kdx.methods import METHODS
from kdx.methods.ab import ab_loss, alternative_l2
from kdx.methods.at import at_loss, attention_map
from kdx.methods.cc import cc_loss
from kdx.methods.connectors import ConvReg
from kdx.methods.feature_layers import match_spatial, parse_layers, select_layers
from kdx.methods.fitnet import hint_loss
from kdx.methods.fsp import fsp_loss, fsp_matrix
from kdx.methods.ft import factor_loss, reconstruction_error
from kdx.methods.nst import nst_loss
from kdx.methods.pkt import pkt_loss
from kdx.methods.rkd import normalised_distances, rkd_angle_loss, rkd_distance_loss
from kdx.methods.sp import sp_loss
from kdx.methods.vid import VIDRegressor, vid_nll
from kdx.models.adapter import as_feature_model
from kdx.models.cifar.resnet import CifarResNet
from kdx.models.small import CNN1D, MLP

FEATURE_METHODS = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst")
MNIST1D_METHODS = ("fitnet", "sp", "cc", "rkd", "pkt")  # the ones that apply to an MLP student


# ---------------------------------------------------------------------------------------------
# Golden values, derived by hand in the comments.


def test_hint_golden():
    # s − t = [[0, 2], [3, 0]] -> squares 0, 4, 9, 0 -> mean 13/4
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert hint_loss(s, t).item() == pytest.approx(3.25)


def test_at_golden():
    # student (B=1, C=2, 1×2): channels [1, 0] and [1, 2]; p = 2: mean_c f² = [(1+1)/2, (0+4)/2] = [1, 2]
    #   -> a_s = [1, 2]/√5.  teacher (C=1): [2, 0] -> squares [4, 0] -> a_t = [1, 0]
    #   (a_s − a_t)² = (1/√5 − 1)² + (2/√5)² = 1 − 2/√5 + 1/5 + 4/5 = 2 − 2/√5; mean over 2: 1 − 1/√5
    f_s = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])
    f_t = torch.tensor([[[[2.0, 0.0]]]])
    assert at_loss(f_s, f_t).item() == pytest.approx(1 - 1 / math.sqrt(5), rel=1e-6)


def test_sp_golden():
    # F_s = I -> G_s = I (rows already unit). F_t = [[1, 0], [1, 0]] -> F_t F_tᵀ = all ones -> rows /√2
    #   G_t − G_s = [[1/√2 − 1, 1/√2], [1/√2, 1/√2 − 1]]; ‖·‖²_F = 2(1/√2 − 1)² + 2·½ = 4 − 2√2
    #   / B² = 4 -> 1 − √2/2
    f_s = torch.eye(2)
    f_t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(f_s, f_t).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_cc_golden():
    # δ = |e_s − 0| = [[1, 2], [3, 4], [0, 0]]; consecutive pairs: 1·3 + 2·4 = 11 and 0 -> mean 5.5
    e_s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    assert cc_loss(e_s, torch.zeros(3, 2)).item() == pytest.approx(5.5)


def test_vid_golden():
    # log_scale = log(e − 1) -> softplus = 1; eps = 1 -> σ² = 2.
    #   diffs 1 and 2: ½(1/2 + ln 2) and ½(4/2 + ln 2); mean = ½(1.25 + ln 2) = 0.625 + ½ ln 2
    prediction, target = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    log_scale = torch.tensor([math.log(math.e - 1)])
    value = vid_nll(prediction, target, log_scale, eps=1.0).item()
    assert value == pytest.approx(0.625 + 0.5 * math.log(2), rel=1e-6)


def test_vid_variance_starts_at_init_pred_var():
    reg = VIDRegressor(3, 4, spatial_axes=2, init_pred_var=5.0, eps=1e-5)
    torch.testing.assert_close(F.softplus(reg.log_scale) + 1e-5, torch.full((4,), 5.0))


def test_rkd_distance_golden():
    # student on a line at 0, 1, 3: distances 1, 3, 2; mean of the 6 off-diagonal entries = 2
    #   -> ψ_s(01, 02, 12) = 0.5, 1.5, 1.  teacher at 0, 2, 4: 2, 4, 2, mean 8/3 -> 0.75, 1.5, 0.75
    #   |diff| = 0.25, 0, 0.25, each twice (symmetric): smooth-L1 ½·0.25² = 1/32 each -> 4/32 over 9 entries
    e_s = torch.tensor([[0.0], [1.0], [3.0]])
    e_t = torch.tensor([[0.0], [2.0], [4.0]])
    assert rkd_distance_loss(e_s, e_t).item() == pytest.approx(4 / 32 / 9, rel=1e-5)


def test_rkd_angle_golden():
    # student e0 = (0,0), e1 = (1,0), e2 = (0,1); teacher e0 = (0,0), e1 = (1,0), e2 = (1,1).
    #   cosine at vertex j between the directions to the other two (degenerate entries are 0 on both
    #   sides, same-direction entries 1 on both): student 0, 1/√2, 1/√2 at vertices 0, 1, 2;
    #   teacher 1/√2, 0, 1/√2.  Two vertices differ by 1/√2, each in two (i, k) orders: 4 entries,
    #   smooth-L1 ½·(1/√2)² = ¼ each -> 1 over B³ = 27 entries
    e_s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    e_t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert rkd_angle_loss(e_s, e_t).item() == pytest.approx(1 / 27, rel=1e-5)


def test_pkt_golden():
    # e_s = I: cos = I -> K = [[1, ½], [½, 1]] -> P_s rows [2/3, 1/3], [1/3, 2/3]
    #   e_t rows equal: cos = 1 -> P_t = ½ everywhere
    #   per row: ½ ln(½ / ⅔) + ½ ln(½ / ⅓) = ½ ln(9/8); two rows, mean over 4 entries: ln(9/8)/4
    e_s = torch.eye(2)
    e_t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(e_s, e_t).item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)


def test_ab_golden():
    # margin 1, element by element (s, t):
    #   (−2, 0): s ≤ −1 and t ≤ 0 -> 0;  (−0.5, 0): (s+1)² = 0.25;  (0.5, 1): (s−1)² = 0.25;
    #   (2, 1): s > 1 -> 0;  (0.5, −1): (1.5)² = 2.25;  (−0.5, 2): (−1.5)² = 2.25  -> ℓ = 5
    s = torch.tensor([[-2.0, -0.5, 0.5, 2.0, 0.5, -0.5]])
    t = torch.tensor([[0.0, 0.0, 1.0, 1.0, -1.0, 2.0]])
    assert alternative_l2(s, t).item() == pytest.approx(5.0)
    # two layers (n = 2): weights 2^(0−1) = ½ and 2^0 = 1; B = 1; ×3/1000: (½·5 + 5)·0.003 = 0.0225
    assert ab_loss([s, s], [t, t]).item() == pytest.approx(0.0225)


def test_ft_golden():
    # factor maps: student one channel [1, 1] -> squares [1, 1] -> [1/√2, 1/√2]; teacher [1, 0] -> [1, 0]
    #   |diff| = (1 − 1/√2) + 1/√2 = 1 over two entries -> 0.5
    f_s = torch.tensor([[[[1.0, 1.0]]]])
    f_t = torch.tensor([[[[1.0, 0.0]]]])
    assert factor_loss(f_s, f_t).item() == pytest.approx(0.5, rel=1e-6)


def test_ft_reconstruction_golden():
    # RepDistiller's plain nn.MSELoss: r = [1, 1], t = [2, 0]: ((1 − 2)² + (1 − 0)²)/2 = 1
    r, t = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    assert reconstruction_error(r, t).item() == pytest.approx(1.0)
    assert reconstruction_error(10 * r, 10 * t).item() == pytest.approx(100.0)  # not scale-free


def test_fsp_golden():
    # lower [1, 2] (one channel, two positions); student upper channels [1, 1], [0, 3]:
    #   G_s = [mean(1·1, 1·2), mean(0·1, 3·2)] = [1.5, 3]; teacher upper [1, 1], [1, 1]: G_t = [1.5, 1.5]
    #   mean((G_s − G_t)²) = (0 + 1.5²)/2 = 1.125
    lower = torch.tensor([[[[1.0, 2.0]]]])
    upper_s = torch.tensor([[[[1.0, 1.0]], [[0.0, 3.0]]]])
    upper_t = torch.ones(1, 2, 1, 2)
    torch.testing.assert_close(fsp_matrix(lower, upper_s), torch.tensor([[[1.5], [3.0]]]))
    assert fsp_loss([lower, upper_s], [lower, upper_t]).item() == pytest.approx(1.125)


def test_nst_golden():
    # student channels (1-D maps) [1, 0] and [0, 1], teacher one channel [1, 0] (all unit norm)
    #   k(t,t) = 1 -> mean 1; k(s,s) = I -> mean ½; k(s,t) = [1, 0] -> mean ½: 1 + ½ − 2·½ = ½
    f_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    f_t = torch.tensor([[[1.0, 0.0]]])
    assert nst_loss(f_s, f_t).item() == pytest.approx(0.5, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Identities.


def test_rkd_distance_term_is_scale_invariant():
    torch.manual_seed(0)
    e_s, e_t = torch.randn(6, 5), torch.randn(6, 7)
    base = rkd_distance_loss(e_s, e_t)
    assert base.item() > 1e-3
    torch.testing.assert_close(rkd_distance_loss(3.0 * e_s, 3.0 * e_t), base)
    torch.testing.assert_close(rkd_distance_loss(0.1 * e_s, e_t), base)  # each side is normalised alone
    torch.testing.assert_close(
        normalised_distances(e_s)[normalised_distances(e_s) > 0].mean(), torch.tensor(1.0)
    )


def test_rkd_angle_term_is_invariant_to_scale_and_translation():
    torch.manual_seed(1)
    e_s, e_t = torch.randn(5, 4), torch.randn(5, 4)
    base = rkd_angle_loss(e_s, e_t)
    assert base.item() > 1e-3
    torch.testing.assert_close(rkd_angle_loss(2.5 * e_s + 1.0, e_t - 3.0), base)
    assert rkd_angle_loss(e_t, e_t).item() == pytest.approx(0.0, abs=1e-7)


def test_relational_terms_vanish_on_identical_inputs():
    torch.manual_seed(2)
    f = torch.randn(4, 3, 4, 4)
    e = torch.randn(5, 8)
    assert at_loss(f, f.clone()).item() == 0.0
    assert pkt_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert cc_loss(e, e.clone()).item() == 0.0
    assert rkd_distance_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert factor_loss(f, f.clone()).item() == 0.0
    assert fsp_loss([f, f], [f.clone(), f.clone()]).item() == 0.0


def test_scale_invariances_of_normalised_terms():
    torch.manual_seed(3)
    f_s, f_t, e_s, e_t = (
        torch.randn(4, 3, 4, 4),
        torch.randn(4, 5, 4, 4),
        torch.randn(6, 4),
        torch.randn(6, 4),
    )
    # AT and SP normalise each example's map / each Gram row; NST each channel; PKT each embedding
    torch.testing.assert_close(at_loss(3.0 * f_s, f_t), at_loss(f_s, f_t))
    torch.testing.assert_close(sp_loss(3.0 * f_s, 0.5 * f_t), sp_loss(f_s, f_t))
    torch.testing.assert_close(nst_loss(3.0 * f_s, f_t), nst_loss(f_s, f_t))
    torch.testing.assert_close(pkt_loss(4.0 * e_s, e_t), pkt_loss(e_s, e_t))
    # AT of one map equals AT of the map with channels permuted (the channel mean ignores order)
    torch.testing.assert_close(attention_map(f_s.flip(1)), attention_map(f_s))


def test_larger_map_is_pooled_to_the_smaller():
    f_s, f_t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    a, b = match_spatial(f_s, f_t)
    assert a.shape == (2, 3, 4, 4) and b is f_t
    torch.testing.assert_close(a, F.adaptive_avg_pool2d(f_s, 4))
    # a map against a vector: both become vectors
    a, b = match_spatial(f_s, torch.randn(2, 7))
    assert a.shape == (2, 3) and b.shape == (2, 7)


def test_layer_specs():
    feats = [torch.zeros(1)] * 5  # stem, 3 stages, embedding
    assert select_layers(feats, parse_layers("1:-1")) == [1, 2, 3]
    assert select_layers(feats, parse_layers(":-1")) == [0, 1, 2, 3]
    assert select_layers(feats, parse_layers("-2")) == [3]
    assert select_layers(feats, parse_layers("1,3")) == [1, 3]
    with pytest.raises(ValueError, match="method.layers"):
        parse_layers("a:b")


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "kind"),
    [
        ((4, 8, 8), (6, 4, 4), torch.nn.Conv2d),  # twice as large: 3×3 stride 2
        ((4, 4, 4), (6, 8, 8), torch.nn.ConvTranspose2d),  # half: 4×4 transposed stride 2
        ((4, 6, 6), (6, 4, 4), torch.nn.Conv2d),  # larger: kernel 1 + 6 − 4 = 3
        ((4, 16), (6, 16), torch.nn.Conv1d),  # 1-D maps, equal sizes: 1×1
        ((4,), (6, 5), torch.nn.Linear),  # vector against a map: pool both
    ],
)
def test_convreg_maps_the_student_to_the_teacher_layout(s_shape, t_shape, kind):
    reg = ConvReg(s_shape, t_shape)
    assert isinstance(reg.conv, kind)
    out = reg(torch.randn(3, *s_shape))
    assert out.shape == reg.teacher(torch.randn(3, *t_shape)).shape
    assert (out >= 0).all()  # ReLU


def test_convreg_refuses_a_student_map_it_cannot_reach():
    # 3 -> 4 is neither half (2), double (8) nor a shrink: RepDistiller raises too
    with pytest.raises(ValueError, match=r"spatial size \(3, 3\) to the teacher's \(4, 4\)"):
        ConvReg((4, 3, 3), (6, 4, 4))


# ---------------------------------------------------------------------------------------------
# The methods on small models: gradient flow, phases, refusals.

INPUT = (3, 8, 8)


def _pair(method_name: str):
    """A thin CIFAR ResNet student and a wider teacher (same widths for FSP, which needs them)."""
    torch.manual_seed(0)
    student = CifarResNet(8, (8, 8, 16, 16), num_classes=5)
    widths = (8, 8, 16, 16) if method_name == "fsp" else (8, 12, 24, 32)
    teacher = CifarResNet(14, widths, num_classes=5)
    s, t = as_feature_model(student), as_feature_model(teacher)
    t.eval().requires_grad_(False)
    return s, t


def _method(name: str, **kwargs):
    return METHODS[name](**kwargs)


def _context(student, teacher, epoch=0):
    return StepContext(student=student, teacher=teacher, epoch=epoch)


def _shaped(input_shape) -> SyntheticDataModule:
    """A data module whose ``input_shape`` the methods' ``setup`` probes the models with."""
    return SyntheticDataModule(input_shape=input_shape, num_classes=5)


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *INPUT, generator=g), torch.randint(0, 5, (n,), generator=g), torch.arange(n)


# methods whose main phase has a term: the init-phase ones run with init_epochs=0 and weight > 0
MAIN_PHASE_KWARGS = {"ab": {"init_epochs": 0, "weight": 1.0}, "fsp": {"init_epochs": 0, "weight": 1.0}}
MAIN_PHASE_KWARGS["ft"] = {"init_epochs": 0}


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_gradient_flow_main_phase(name):
    student, teacher = _pair(name)
    method = _method(name, **MAIN_PHASE_KWARGS.get(name, {}))
    method.setup(student, teacher, _shaped(INPUT))
    terms = method.training_step(_batch(), _context(student, teacher))
    assert torch.isfinite(terms["loss"]) and terms[name].item() > 0
    torch.testing.assert_close(terms["loss"], terms["ce"] + method.weight * terms[name])
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.layer1.parameters())
    learned = {n: p for n, p in method.named_parameters()}
    frozen_in_main = ("paraphraser.",)  # FT's paraphraser is trained only in its init phase
    for pname, p in learned.items():
        if pname.startswith(frozen_in_main):
            assert p.grad is None, pname
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
    expected_learned = {"fitnet": "regressor.", "cc": "embed_t.", "vid": "regressors.", "ft": "translator."}
    if name in expected_learned:
        assert any(n.startswith(expected_learned[name]) for n in learned)


@pytest.mark.parametrize("name", ("ab", "fsp", "ft", "fitnet"))
def test_init_phase_returns_only_the_init_term(name):
    student, teacher = _pair(name)
    method = _method(name, init_epochs=2)
    method.setup(student, teacher, _shaped(INPUT))
    # the pre-training phase is its own step (kdx.pipeline.pretrain), whatever the epoch
    terms = method.init_training_step(_batch(), _context(student, teacher, epoch=1))
    assert set(terms) == {"loss", f"{name}_init"}
    assert terms["loss"].item() > 0
    torch.testing.assert_close(terms["loss"], terms[f"{name}_init"])  # unweighted, as the official init
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.model.fc.parameters())  # no classification yet
    student_grads = [p.grad for p in student.model.layer1.parameters()]
    if name == "ft":  # only the paraphraser learns (the student is not even run)
        assert all(g is None for g in student_grads)
        assert all(p.grad is not None for p in method.paraphraser.parameters())
        assert all(p.grad is None for p in method.translator.parameters())
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    # training_step is always the main phase, from epoch 0 of the main fit
    main = method.training_step(_batch(), _context(student, teacher, epoch=0))
    assert "ce" in main and f"{name}_init" not in main


@pytest.mark.parametrize("name", ("ab", "fsp"))
def test_main_phase_of_pretraining_methods_is_cross_entropy_by_default(name):
    # RepDistiller: loss_kd = 0 after the init epochs, so the loss is γ·CE alone
    student, teacher = _pair(name)
    method = _method(name)
    method.setup(student, teacher, _shaped(INPUT))
    x, y, index = _batch()
    terms = method.training_step((x, y, index), _context(student, teacher, epoch=method.init_epochs))
    torch.testing.assert_close(terms["loss"], F.cross_entropy(student(x, ("logits",)).logits, y))
    assert name not in terms


def test_rkd_logs_both_parts():
    student, teacher = _pair("rkd")
    method = _method("rkd")
    method.setup(student, teacher, _shaped(INPUT))
    terms = method.training_step(_batch(), _context(student, teacher))
    torch.testing.assert_close(terms["rkd"], 25 * terms["rkd_distance"] + 50 * terms["rkd_angle"])


def test_optional_kd_term():
    student, teacher = _pair("at")
    method = _method("at", kd_weight=0.9, ce_weight=0.1)
    method.setup(student, teacher, _shaped(INPUT))
    terms = method.training_step(_batch(), _context(student, teacher))
    torch.testing.assert_close(terms["loss"], 0.1 * terms["ce"] + 0.9 * terms["kd"] + 1000 * terms["at"])


def _mnist1d_pair():
    torch.manual_seed(0)
    student = as_feature_model(MLP(10, (40,), hidden=(16, 16)))
    teacher = as_feature_model(CNN1D(10, (40,), channels=(8, 12, 12)))
    teacher.eval().requires_grad_(False)
    return student, teacher


@pytest.mark.parametrize("name", MNIST1D_METHODS)
def test_applies_to_an_mlp_student_and_a_1d_cnn_teacher(name):
    student, teacher = _mnist1d_pair()
    method = _method(name)
    method.setup(student, teacher, _shaped((40,)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 40, generator=g), torch.randint(0, 10, (6,), generator=g)
    terms = method.training_step((x, y, torch.arange(6)), _context(student, teacher))
    assert torch.isfinite(terms["loss"]) and terms[name].item() > 0


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("at", "needs feature maps with spatial axes"),
        ("nst", "needs feature maps with spatial axes"),
        ("vid", "pairs student and teacher layers one to one"),
        ("ab", "MLP has a model without them; set method.features=stages"),
        ("ab_stages", "pairs student and teacher layers one to one"),
        ("ft", "same number"),
        ("fsp", "pairs student and teacher layers one to one"),
    ],
)
def test_refuses_an_mlp_student_with_one_clear_error(name, match):
    student, teacher = _mnist1d_pair()
    kwargs = {"layers": "-2"} if name in ("at", "nst") else {}  # one layer each: reach the shape check
    if name == "ab_stages":  # AB on post-activation stages reaches the layer check
        name, kwargs = "ab", {"features": "stages"}
    with pytest.raises(KDXError, match=match):
        _method(name, **kwargs).setup(student, teacher, _shaped((40,)))


def test_fsp_refuses_unequal_widths():
    student, _ = _pair("fsp")
    _, teacher = _pair("at")  # widths (8, 12, 24, 32) against (8, 8, 16, 16)
    with pytest.raises(KDXError, match="fsp .*equal channel counts"):
        _method("fsp").setup(student, teacher, _shaped(INPUT))


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="method.weight"):
        METHODS["at"](weight=-1.0)
    with pytest.raises(ValueError, match="method.init_epochs"):
        METHODS["ab"](init_epochs=-1)
    with pytest.raises(ValueError, match="method.layers"):
        METHODS["vid"](layers="one")
    with pytest.raises(KDXError, match="hint_layer=7"):
        METHODS["fitnet"](hint_layer=7).setup(*_pair("fitnet"), _shaped(INPUT))


def test_a_checkpoint_loads_into_a_method_that_was_not_set_up():
    # kdx-eval builds the method without fit's setup(): the stored connectors are skipped, not an error
    student, teacher = _pair("fitnet")
    method = _method("fitnet")
    method.setup(student, teacher, _shaped(INPUT))
    state = method.state_dict()
    assert any(k.startswith("regressor.") for k in state)
    fresh = _method("fitnet")
    fresh.load_state_dict(state)  # strict
    assert fresh.regressor is None
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a set-up method still loads strictly
        method.load_state_dict({**state, "regressor.extra": torch.zeros(1)})
