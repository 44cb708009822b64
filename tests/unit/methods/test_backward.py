"""method=backward (Jafari et al. 2023): golden values, docs/methods.md §2 properties, end-to-end runs."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from torch import nn

from conftest import FAST, compose_train, run_train
from kdx.context import StepContext
from kdx.data.synthetic import SyntheticDataModule
from kdx.methods.backward import BackwardPassKD, divergence
from kdx.models.adapter import as_feature_model
from kdx.models.small import CNN1D, MLP
from kdx.module import DistillationModule

LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


def linear(weight, bias=(0.0, 0.0)) -> nn.Module:
    layer = nn.Linear(2, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return nn.Sequential(layer)


def context_of(student: nn.Module, teacher: nn.Module) -> StepContext:
    teacher.requires_grad_(False)
    return StepContext(student=as_feature_model(student), teacher=as_feature_model(teacher))


# -- golden values, by hand --------------------------------------------------------------------
#
# Two classes, inputs in R². Student: all-zero linear layer, so z_s = 0 and p_s = (1/2, 1/2) for any x.
# Teacher: z_t = W x. For p_s uniform, D = KL(p_t ‖ u) and its gradient w.r.t. the teacher logits is
#     ∂D/∂z_k = p_k (log(p_k / u_k) − D).
# At p_t = (3/4, 1/4): D = 3/4·ln(3/2) + 1/4·ln(1/2) = 3/4·ln3 − ln2, and
#     ∂D/∂z_1 = 3/4·(ln3 − ln2 − 3/4·ln3 + ln2) = 3/16·ln3 > 0,  ∂D/∂z_2 = −3/16·ln3,
# so ∇_x D = Wᵀ (3/16·ln3, −3/16·ln3) = 3/16·ln3 · (W₁₁ − W₂₁, W₁₂ − W₂₂).
# With W = [[3, 4], [0, 0]]: ∇_x D ∝ (3, 4): the normalized step is η·(0.6, 0.8), the sign step
# η·(1, 1). x = (ln3/3, 0) gives z_t = (ln3, 0), i.e. p_t = (3/4, 1/4).


@pytest.mark.parametrize(("step", "direction"), [("normalized", (0.6, 0.8)), ("sign", (1.0, 1.0))])
def test_golden_step_directions(step, direction):
    ctx = context_of(linear([[0, 0], [0, 0]]), linear([[3, 4], [0, 0]]))
    x = torch.tensor([[LN3 / 3, 0.0]], dtype=torch.float64)
    eta = 0.01
    x_aux = BackwardPassKD(temperature=1.0, step=step, step_size=eta, step_scale="absolute").generate(ctx, x)
    expected = x + eta * torch.tensor([direction], dtype=torch.float64)
    torch.testing.assert_close(x_aux, expected)


def test_golden_projections():
    ctx = context_of(linear([[0, 0], [0, 0]]), linear([[3, 4], [0, 0]]))
    x = torch.tensor([[LN3 / 3, 0.0]], dtype=torch.float64)
    # 3 steps of 0.1 along (0.6, 0.8) would travel 0.3; the L2 ε-ball of 0.05 stops it at 0.05·(0.6, 0.8)
    m = BackwardPassKD(temperature=1.0, steps=3, step_size=0.1, epsilon=0.05, step_scale="absolute")
    torch.testing.assert_close(m.generate(ctx, x), x + 0.05 * torch.tensor([[0.6, 0.8]], dtype=torch.float64))
    # sign steps: the L∞ ball clamps each coordinate of δ = 0.3·(1, 1) to 0.05
    m = BackwardPassKD(
        temperature=1.0, steps=3, step_size=0.1, step="sign", epsilon=0.05, step_scale="absolute"
    )
    torch.testing.assert_close(m.generate(ctx, x), x + 0.05)
    # the data range: x₁ + 0.6·0.1 would exceed clamp_max = x₁ + 0.01; x₂ moves freely
    hi = LN3 / 3 + 0.01
    m = BackwardPassKD(temperature=1.0, step_size=0.1, clamp_max=hi, step_scale="absolute")
    torch.testing.assert_close(m.generate(ctx, x), torch.tensor([[hi, 0.08]], dtype=torch.float64))


# Loss golden value. Teacher W = [[1, 0], [0, 0]], x = (T·ln3, 7): z_t/T = (ln3, 0), p_t = (3/4, 1/4).
# ∇_x D ∝ (1, 0) (see above), so k steps of the normalized step give x_aux = x + k·η·(1, 0).
# Taking k·η = T·ln(5/3): z_t(x_aux)/T = (ln5, 0), p_t = (5/6, 1/6) and
#     KL(p_t(x_aux) ‖ u) = 5/6·ln(5/3) + 1/6·ln(1/3) = 5/6·ln5 − ln3.
# CE of zero logits is ln2 whatever the label, so
#     L = (1−α)·ln2 + α·T²·(3/4·ln3 − ln2) + λ·T²·(5/6·ln5 − ln3).
@pytest.mark.parametrize(
    ("temperature", "alpha", "aux_weight", "steps"), [(1.0, 0.5, 1.0, 1), (2.0, 0.9, 0.5, 2)]
)
def test_golden_loss(temperature, alpha, aux_weight, steps):
    T = temperature
    ctx = context_of(linear([[0, 0], [0, 0]]), linear([[1, 0], [0, 0]]))
    x = torch.tensor([[T * LN3, 7.0]], dtype=torch.float64)
    y = torch.tensor([1])
    eta = T * math.log(5 / 3) / steps
    m = BackwardPassKD(
        alpha=alpha, temperature=T, aux_weight=aux_weight, steps=steps, step_size=eta, step_scale="absolute"
    )
    terms = m.training_step((x, y, torch.tensor([0])), ctx)
    kd = 3 / 4 * LN3 - LN2
    aux = 5 / 6 * LN5 - LN3
    assert terms["ce"].item() == pytest.approx(LN2, rel=1e-9)
    assert terms["kd"].item() == pytest.approx(T**2 * kd, rel=1e-9)
    assert terms["aux_kd"].item() == pytest.approx(T**2 * aux, rel=1e-9)
    # the move, relative to ‖x‖ = √((T·ln3)² + 49)
    move = T * math.log(5 / 3) / math.hypot(T * LN3, 7.0)
    assert terms["aux/move"].item() == pytest.approx(move, rel=1e-6)
    assert terms["aux/kl_gain"].item() == pytest.approx(aux / kd, rel=1e-9)
    expected = (1 - alpha) * LN2 + alpha * T**2 * kd + aux_weight * T**2 * aux
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)


# -- scale-aware steps, the control, the divergence choice ------------------------------------
#
# With the teacher of the golden tests above (∇_x D ∝ (0.6, 0.8) at every x with p_t = (3/4, 1/4))
# and x = (ln3/3, 0): ‖x‖ = ln3/3, n = 2.
#   step_scale=norm, normalized: δ = η·‖x‖·(0.6, 0.8)              (‖δ‖/‖x‖ = η)
#   step_scale=norm, sign:       δ = η·(‖x‖/√2)·(1, 1)              (‖δ‖/‖x‖ = η again)
#   step_scale=rms over the batch {x, 3x}: RMS² = mean of the 4 entries squared
#     = ((ln3/3)² + (ln3)²)/4 = 10·(ln3/3)²/4, and both samples move s = RMS·√2 (one length).


@pytest.mark.parametrize("step", ["normalized", "sign"])
def test_relative_step_moves_eta_of_the_norm(step):
    ctx = context_of(linear([[0, 0], [0, 0]]), linear([[3, 4], [0, 0]]))
    x = torch.tensor([[LN3 / 3, 0.0]], dtype=torch.float64)
    eta, norm = 0.3, LN3 / 3
    x_aux = BackwardPassKD(temperature=1.0, step=step, step_size=eta).generate(ctx, x)  # norm: default
    direction = (0.6, 0.8) if step == "normalized" else (1 / math.sqrt(2), 1 / math.sqrt(2))
    torch.testing.assert_close(x_aux, x + eta * norm * torch.tensor([direction], dtype=torch.float64))
    # the same relative move for an input 10 times larger: the step scales with the input
    x_aux10 = BackwardPassKD(temperature=1.0, step=step, step_size=eta).generate(ctx, 10 * x)
    assert (x_aux10 - 10 * x).norm().item() == pytest.approx(eta * 10 * norm, rel=1e-9)


def test_rms_scale_is_one_length_for_the_batch():
    ctx = context_of(linear([[0, 0], [0, 0]]), linear([[3, 4], [0, 0]]))
    x = torch.tensor([[LN3 / 3, 0.0], [LN3, 0.0]], dtype=torch.float64)
    s = math.sqrt(10 * (LN3 / 3) ** 2 / 4) * math.sqrt(2)
    x_aux = BackwardPassKD(temperature=1.0, step_size=0.1, step_scale="rms").generate(ctx, x)
    moves = (x_aux - x).norm(dim=1)
    torch.testing.assert_close(moves, torch.full((2,), 0.1 * s, dtype=torch.float64))


def test_step_size_zero_is_reweighted_kd():
    # the control: x_aux = x, so aux_kd = kd and L = (1-α)·CE + (α+λ)·T²·KL, kl_gain = 1
    student, teacher = _toy_pair()
    ctx = context_of(student, teacher)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    m = BackwardPassKD(alpha=0.9, aux_weight=1.0, step_size=0.0)
    assert torch.equal(m.generate(ctx, x), x)
    terms = m.training_step((x, y, torch.arange(16)), ctx)
    torch.testing.assert_close(terms["aux_kd"], terms["kd"])
    torch.testing.assert_close(terms["loss"], 0.1 * terms["ce"] + 1.9 * terms["kd"])
    assert terms["aux/kl_gain"].item() == pytest.approx(1.0) and terms["aux/move"].item() == 0.0


def test_random_direction_control_moves_the_same_length_without_a_backward_pass():
    # direction=random: each sample moves η·‖x‖ (normalized step) like the method, along a random
    # direction: the divergence is never evaluated, and the direction is not the gradient's (0.6, 0.8)
    x = torch.tensor([[LN3 / 3, 0.0], [0.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
    calls = []
    perturb = BackwardPassKD(step_size=0.3, direction="random").perturb
    torch.manual_seed(0)
    x_aux = perturb(x, lambda z: calls.append(z) or z.sum(-1))
    assert calls == []
    torch.testing.assert_close((x_aux - x).norm(dim=1), 0.3 * x.norm(dim=1))
    ctx = context_of(linear([[0, 0], [0, 0]]), linear([[3, 4], [0, 0]]))
    moves = [
        BackwardPassKD(temperature=1.0, step_size=0.01, step_scale="absolute", direction="random").generate(
            ctx, x[:1]
        )
        - x[:1]
        for _ in range(2)
    ]
    gradient_step = 0.01 * torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    assert not torch.allclose(moves[0], moves[1]) and not torch.allclose(moves[0], gradient_step)
    with pytest.raises(ValueError, match="method.direction="):
        BackwardPassKD(direction="adversarial")


def test_default_step_raises_the_divergence_on_a_fixed_tiny_case():
    # A fixed pair of small random MLPs on standard-normal inputs (the scale of MNIST-1D, whose
    # values are standardised): one default step (η = 0.2 of ‖x‖) must raise the mean KL by
    # more than 1.3×, so that the auxiliary samples measurably move the divergence (0.05 in input
    # units gives about ×1.06 here, the MNIST-1D figure: too small a move to matter).
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    teacher = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    ctx = context_of(student, teacher)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    gain = BackwardPassKD().training_step((x, y, torch.arange(64)), ctx)["aux/kl_gain"].item()
    old = BackwardPassKD(step_size=0.05, step_scale="absolute").training_step((x, y, torch.arange(64)), ctx)
    assert gain > 1.3
    assert old["aux/kl_gain"].item() < 1.1


def test_l2_divergence_ascends_the_logit_distance():
    # D = mean_k (z_s − z_t)²; student z_s = 0, teacher z_t = W x with W = [[3, 4], [0, 0]]:
    # D = (3x₁ + 4x₂)²/2, ∇_x D = (3x₁ + 4x₂)·(3, 4) ∝ (0.6, 0.8) for 3x₁ + 4x₂ > 0
    ctx = context_of(linear([[0, 0], [0, 0]]), linear([[3, 4], [0, 0]]))
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    x_aux = BackwardPassKD(divergence="l2", step_size=0.5, step_scale="absolute").generate(ctx, x)
    torch.testing.assert_close(x_aux, x + 0.5 * torch.tensor([[0.6, 0.8]], dtype=torch.float64))


# -- docs/methods.md §2 ------------------------------------------------------------------------


@pytest.mark.parametrize("model_cls", [MLP, CNN1D])
@pytest.mark.parametrize("step", ["normalized", "sign"])
def test_identical_models_leave_inputs_unchanged(model_cls, step):
    torch.manual_seed(0)
    student = model_cls(10, (1, 40))
    ctx = context_of(student, copy.deepcopy(student))
    x = torch.randn(8, 1, 40)
    x_aux = BackwardPassKD(step=step, steps=3).generate(ctx, x)
    assert torch.equal(x_aux, x)  # D ≡ 0, ∇D = 0: no 0/0, no move
    assert torch.isfinite(x_aux).all()


def _toy_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    make = lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()  # noqa: E731
    return make(), make()


@pytest.mark.parametrize("step", ["normalized", "sign"])
def test_generated_samples_increase_divergence(step):
    student, teacher = _toy_pair()
    ctx = context_of(student, teacher)
    x = torch.randn(32, 6, dtype=torch.float64)
    m = BackwardPassKD(temperature=2.0, step=step, step_size=1e-3)
    x_aux = m.generate(ctx, x)
    with torch.no_grad():
        before = divergence(ctx.student(x).logits, ctx.teacher(x).logits, 2.0)
        after = divergence(ctx.student(x_aux).logits, ctx.teacher(x_aux).logits, 2.0)
    assert (after > before).all()
    # more steps climb further
    x_aux3 = BackwardPassKD(temperature=2.0, step=step, step_size=1e-3, steps=3).generate(ctx, x)
    with torch.no_grad():
        after3 = divergence(ctx.student(x_aux3).logits, ctx.teacher(x_aux3).logits, 2.0)
    assert after3.mean() > after.mean()


def _module(method, student=None, teacher=None) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        student=student or MLP(10, (1, 40)),
        method=method,
        num_classes=10,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        teacher=teacher or CNN1D(10, (1, 40), channels=(8, 8, 8)),
    )


def test_generation_gives_no_parameter_a_gradient():
    module = _module(BackwardPassKD(steps=2)).train()
    ctx = StepContext(student=module.student, teacher=module.teacher)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    module.method.generate(ctx, x)
    assert all(p.grad is None for p in module.student.parameters()), "generation gave the student a gradient"
    terms = module.method.training_step((x, y, torch.arange(16)), ctx)
    terms["loss"].backward()
    assert all(p.grad is not None for p in module.student.parameters())


def test_generation_leaves_batchnorm_statistics_and_modes_alone():
    torch.manual_seed(0)
    student, teacher = CNN1D(10, (1, 40), channels=(8, 8, 8)), CNN1D(10, (1, 40), channels=(8, 8, 8))
    module = _module(BackwardPassKD(steps=3), student=student, teacher=teacher).train()
    modes = {name: m.training for name, m in module.named_modules()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    assert any("running_mean" in name for name in buffers) and any("teacher" in name for name in buffers)
    module.method.generate(
        StepContext(student=module.student, teacher=module.teacher), torch.randn(16, 1, 40) * 3 + 1
    )
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert module.student.training and not module.teacher.training
    for name, b in module.named_buffers():
        assert torch.equal(b, buffers[name]), f"{name} changed during generation"


# -- offline mode ------------------------------------------------------------------------------


def test_offline_aux_set_is_built_cached_and_cycled():
    dm = SyntheticDataModule(
        input_shape=(1, 40), num_classes=10, num_train=96, num_val=16, num_test=16, batch_size=16, seed=0
    )
    dm.setup("fit")
    method = BackwardPassKD(mode="offline", offline_size=40, step_size=0.1)
    module = _module(method).train()
    ctx = StepContext(student=module.student, teacher=module.teacher, datamodule=dm)
    method.on_train_epoch_start(ctx)
    assert method._aux_x.shape == (40, 1, 40) and method._aux_teacher.shape == (40, 10)
    with torch.no_grad():
        torch.testing.assert_close(method._aux_teacher, module.teacher(method._aux_x).logits)
    seen = []
    x, y, idx = next(iter(dm.train_dataloader()))
    for _ in range(5):  # 5 × 8 = 40: one pass over the auxiliary set
        x_aux, _ = method._next_aux_batch(ctx, 8)
        seen.append(x_aux)
    seen = torch.cat(seen)
    assert torch.equal(seen[seen[:, 0, 0].argsort()], method._aux_x[method._aux_x[:, 0, 0].argsort()])
    terms = method.training_step((x, y, idx), ctx)
    assert set(terms) == {"loss", "ce", "kd", "aux_kd", "aux/kl_gain"} and torch.isfinite(terms["loss"])


def test_offline_rounds_every_n_epochs_and_cumulative_growth():
    dm = SyntheticDataModule(
        input_shape=(1, 40), num_classes=10, num_train=96, num_val=16, num_test=16, batch_size=16, seed=0
    )
    dm.setup("fit")
    method = BackwardPassKD(mode="offline", offline_size=24, regenerate_every=2, cumulative=True)
    module = _module(method).train()
    ctx = StepContext(student=module.student, teacher=module.teacher, datamodule=dm)
    sizes = []
    for epoch in range(5):  # rounds at epochs 0, 2, 4: 24, 48, 72 samples
        ctx.epoch = epoch
        method.on_train_epoch_start(ctx)
        sizes.append(len(method._aux_x))
    assert sizes == [24, 24, 48, 48, 72]
    replacing = BackwardPassKD(mode="offline", offline_size=24)
    module = _module(replacing).train()
    ctx.student, ctx.teacher = module.student, module.teacher
    for epoch in range(3):
        ctx.epoch = epoch
        replacing.on_train_epoch_start(ctx)
    assert len(replacing._aux_x) == 24
    with pytest.raises(ValueError, match="cumulative"):
        BackwardPassKD(cumulative=True)


def test_bad_values_fail_clearly():
    with pytest.raises(ValueError, match="method.step="):
        BackwardPassKD(step="l1")
    with pytest.raises(ValueError, match="method.mode="):
        BackwardPassKD(mode="sometimes")
    with pytest.raises(ValueError, match="method.step_scale="):
        BackwardPassKD(step_scale="relative")
    with pytest.raises(ValueError, match="method.divergence="):
        BackwardPassKD(divergence="js")
    with pytest.raises(TypeError, match="embedding-space"):
        BackwardPassKD().perturb(torch.zeros(2, 3, dtype=torch.long), lambda z: z.sum(-1))


def test_misspelt_key_fails_at_compose(tmp_path, cache_dir):
    with pytest.raises(Exception, match="stepsize"):
        compose_train(["method=backward", "method.stepsize=0.1"], tmp_path, cache_dir)


# -- end to end through Hydra ------------------------------------------------------------------


def test_fast_dev_run_offline_hier_synthetic(tmp_path, cache_dir):
    metrics = run_train(
        [
            *FAST,
            "method=backward",
            "dataset=hier_synthetic",
            "method.mode=offline",
            "method.offline_size=256",
            "method.step=sign",
            "method.steps=2",
            "method.epsilon=0.1",
        ],
        tmp_path,
        cache_dir,
    )
    assert metrics["status"] == "ok" and metrics["dataset"] == "hier_synthetic"


SMALL_CIFAR = [
    "dataset.datamodule.batch_size=16",
    "dataset.datamodule.num_train=64",
    "dataset.datamodule.num_val=32",
    "dataset.datamodule.num_test=32",
]


def test_fast_dev_run_cifar_zoo_pair(tmp_path, cache_dir):
    metrics = run_train(
        [
            *FAST,
            "method=backward",
            "dataset=synthetic_cifar",
            "teacher=resnet20",
            "student=resnet8",
            *SMALL_CIFAR,
        ],
        tmp_path,
        cache_dir,
    )
    assert metrics["status"] == "ok"
