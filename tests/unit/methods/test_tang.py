"""Tang et al.'s synthetic-teacher family: ls, kd_pt, kd_sim, kd_pt_sim.

Golden values are derived by hand on K = 3 classes, B = 2 examples (comments below) and computed
here with plain ``math`` from those derivations, never by calling the implementation's helpers.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from torch import nn

from conftest import compose_train
from kdx.methods import METHODS
from kdx.models.base import ModelOutput
from kdx.models.small import MLP
from kdx.module import DistillationModule

ROOT = Path(__file__).resolve().parents[3]
FAMILY = ("ls", "kd_pt", "kd_sim", "kd_pt_sim")
LN2, LN3, LN6 = math.log(2), math.log(3), math.log(6)

# ---------------------------------------------------------------------------------------------
# The tiny fixed input (K = 3, B = 2, T = 2, α = 0.5).
#
# labels            y = [0, 2]
# student logits    z_1 = [2 ln 2, 0, 0]  ->  z_1/T = [ln 2, 0, 0]  ->  p^T_1 = [1/2, 1/4, 1/4]
#                                              at T = 1: softmax = [4, 1, 1]/6, so CE_1 = -ln(4/6) = ln 1.5
#                   z_2 = [0, 0, 0]       ->  p^T_2 = p_2 = [1/3, 1/3, 1/3], CE_2 = ln 3
# teacher logits    t_1 = [2 ln 6, 2 ln 3, 0] -> t_1/T = [ln 6, ln 3, 0] -> p^T_t1 = [6, 3, 1]/10 = [.6, .3, .1]
#                   t_2 = [2 ln 2, 0, 0]      -> p^T_t2 = [.5, .25, .25]
# teacher classifier rows w_0 = [2, 0], w_1 = [0, 3], w_2 = [1, 1]  ->  unit rows [1,0], [0,1], [1,1]/√2
#                   S = [[1, 0, 1/√2], [0, 1, 1/√2], [1/√2, 1/√2, 1]]
# loss = (1-α)·mean(CE) + α·T²·mean_b KL(q_b ‖ p^T_b),  KL(q‖p) = Σ_k q_k ln(q_k/p_k)
# ---------------------------------------------------------------------------------------------
T, ALPHA = 2.0, 0.5
Y = torch.tensor([0, 2])
ZS = torch.tensor([[2 * LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
ZT = torch.tensor([[2 * LN6, 2 * LN3, 0.0], [2 * LN2, 0.0, 0.0]])
W_T = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
P_S = [[1 / 2, 1 / 4, 1 / 4], [1 / 3, 1 / 3, 1 / 3]]
CE_MEAN = (math.log(1.5) + LN3) / 2
R2 = 1 / math.sqrt(2)


def kl(q: list[float], p: list[float]) -> float:
    return sum(qk * math.log(qk / pk) for qk, pk in zip(q, p) if qk > 0)


def expected_loss(q: list[list[float]]) -> float:
    soft = T**2 * (kl(q[0], P_S[0]) + kl(q[1], P_S[1])) / 2
    return (1 - ALPHA) * CE_MEAN + ALPHA * soft


def softmax_list(v: list[float]) -> list[float]:
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


class _Teacher(nn.Module):
    """Stands in for a FeatureModel: only ``.classifier`` is read by ``setup``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)


def make(name: str, **kwargs):
    method = METHODS[name](alpha=ALPHA, temperature=T, **kwargs)
    if name in ("kd_sim", "kd_pt_sim"):
        method.setup(None, _Teacher(W_T), None)
    return method


def run_loss(method, zs=ZS, zt=ZT, y=Y):
    return method.loss(ModelOutput(zs.clone()), ModelOutput(zt.clone()), y, torch.arange(len(y)))


def assert_rows(actual: torch.Tensor, expected: list[list[float]]) -> None:
    assert torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6), actual


# ---------------------------------------------------------------------------------------------
# Golden values.


def test_ls_golden():
    # ε = 0.3, K = 3: q_y = 0.7, each wrong class 0.3/2 = 0.15 (no teacher involved)
    q = [[0.7, 0.15, 0.15], [0.15, 0.15, 0.7]]
    method = make("ls", epsilon=0.3)
    assert_rows(method.targets(Y, None, 3), q)
    terms = method.loss(ModelOutput(ZS.clone()), None, Y, torch.arange(2))
    assert terms["ce"].item() == pytest.approx(CE_MEAN, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(expected_loss(q), abs=1e-6)


def test_kd_pt_golden():
    # T' = T = 2: p^T_t,y is 0.6 (example 1, y = 0) and 0.25 (example 2, y = 2)
    # q_1 = [0.6, 0.4/2, 0.4/2] = [0.6, 0.2, 0.2];  q_2 = [0.75/2, 0.75/2, 0.25] = [0.375, 0.375, 0.25]
    q = [[0.6, 0.2, 0.2], [0.375, 0.375, 0.25]]
    method = make("kd_pt")
    assert_rows(method.targets(Y, ZT, 3), q)
    assert run_loss(method)["loss"].item() == pytest.approx(expected_loss(q), abs=1e-6)


def test_kd_pt_target_temperature_one():
    # T' = 1: softmax(t_1) = [36, 9, 1]/46 -> p_t,y = 36/46; softmax(t_2) = [4, 1, 1]/6 -> p_t,y = 1/6
    a, b = 36 / 46, 1 / 6
    q = [[a, (1 - a) / 2, (1 - a) / 2], [(1 - b) / 2, (1 - b) / 2, b]]
    method = make("kd_pt", target_temperature=1.0)
    assert_rows(method.targets(Y, ZT, 3), q)
    assert run_loss(method)["loss"].item() == pytest.approx(expected_loss(q), abs=1e-6)


def test_kd_sim_golden():
    # τ_s = 0.5: q = softmax(S[y]/0.5) = softmax(2·S[y])
    # y = 0: S[0] = [1, 0, 1/√2] -> softmax([2, 0, √2]);  y = 2: S[2] = [1/√2, 1/√2, 1] -> softmax([√2, √2, 2])
    q = [softmax_list([2, 0, 2 * R2]), softmax_list([2 * R2, 2 * R2, 2])]
    method = make("kd_sim", sim_temperature=0.5)
    assert torch.allclose(method.similarity, torch.tensor([[1, 0, R2], [0, 1, R2], [R2, R2, 1]]), atol=1e-6)
    assert_rows(method.targets(Y, None, 3), q)
    assert run_loss(method)["loss"].item() == pytest.approx(expected_loss(q), abs=1e-6)


def test_kd_sim_true_mass_golden():
    # true_mass m = 0.8, τ_s = 0.5; y = 0: the rest 0.2 over classes {1, 2} ∝ [e^0, e^√2]
    # y = 2: classes {0, 1} have equal similarity 1/√2 -> 0.1 each
    e = math.exp(2 * R2)
    q = [[0.8, 0.2 / (1 + e), 0.2 * e / (1 + e)], [0.1, 0.1, 0.8]]
    method = make("kd_sim", sim_temperature=0.5, true_mass=0.8)
    assert_rows(method.targets(Y, None, 3), q)


def test_kd_pt_sim_golden():
    # q_y = p^T_t,y (0.6 and 0.25, as in kd_pt); τ_s = 0.5
    # y = 0: the rest 0.4 over {1, 2} ∝ [exp(0/0.5), exp((1/√2)/0.5)] = [1, e^√2]
    # y = 2: the rest 0.75 over {0, 1}, equal similarity -> 0.375 each (same as kd_pt)
    e = math.exp(2 * R2)
    q = [[0.6, 0.4 / (1 + e), 0.4 * e / (1 + e)], [0.375, 0.375, 0.25]]
    method = make("kd_pt_sim", sim_temperature=0.5)
    assert_rows(method.targets(Y, ZT, 3), q)
    assert run_loss(method)["loss"].item() == pytest.approx(expected_loss(q), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The identities of docs/methods.md §3.


def test_kd_pt_rows_sum_to_one_and_hold_teacher_confidence():
    g = torch.Generator().manual_seed(0)
    zt, y = 3 * torch.randn(16, 7, generator=g), torch.randint(7, (16,), generator=g)
    for t_prime in (None, 1.0):
        method = METHODS["kd_pt"](temperature=4.0, target_temperature=t_prime)
        q = method.targets(y, zt, 7)
        p_true = F.softmax(zt / (t_prime or 4.0), -1)[torch.arange(16), y]
        assert torch.allclose(q.sum(1), torch.ones(16), atol=1e-6)
        assert torch.allclose(q[torch.arange(16), y], p_true, atol=1e-6)
        off = q.masked_select(~F.one_hot(y, 7).bool()).view(16, 6)
        assert torch.allclose(off, ((1 - p_true) / 6)[:, None].expand(16, 6), atol=1e-6)


def test_kd_pt_with_uniform_off_gt_teacher_equals_ls_and_kd():
    # teacher logits a·onehot(y): at T every wrong class gets the same mass, p^T_t,y = e^{a/T}/(e^{a/T}+K-1)
    k, a, t = 5, 6.0, 4.0
    y = torch.tensor([0, 3, 1, 4, 2, 3])
    zt = a * F.one_hot(y, k).float()
    zs = torch.randn(6, k, generator=torch.Generator().manual_seed(1))
    p_y = math.exp(a / t) / (math.exp(a / t) + k - 1)
    kd_pt = METHODS["kd_pt"](alpha=0.7, temperature=t)
    ls = METHODS["ls"](alpha=0.7, temperature=t, epsilon=1 - p_y)
    kd = METHODS["kd"](alpha=0.7, temperature=t)
    assert torch.allclose(kd_pt.targets(y, zt, k), ls.targets(y, None, k), atol=1e-6)
    losses = [
        m.loss(ModelOutput(zs), ModelOutput(zt), y, torch.arange(6))["loss"].item() for m in (kd_pt, ls, kd)
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0] == pytest.approx(losses[2], abs=1e-5)


def test_kd_sim_row_is_constant_within_a_class():
    g = torch.Generator().manual_seed(2)
    method = METHODS["kd_sim"]()
    method.setup(None, _Teacher(torch.randn(6, 8, generator=g)), None)
    y = torch.tensor([0, 3, 0, 5, 3, 0, 1])
    q = method.targets(y, None, 6)
    assert torch.allclose(q.sum(1), torch.ones(7), atol=1e-6)
    for cls in y.unique():
        rows = q[y == cls]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    assert not torch.allclose(q[0], q[1])  # classes 0 and 3 differ


def test_kd_pt_sim_rows_and_similarity_order():
    g = torch.Generator().manual_seed(3)
    method = METHODS["kd_pt_sim"](temperature=4.0)
    weight = torch.randn(6, 8, generator=g)
    method.setup(None, _Teacher(weight), None)
    zt, y = torch.randn(10, 6, generator=g), torch.randint(6, (10,), generator=g)
    q = method.targets(y, zt, 6)
    assert torch.allclose(q.sum(1), torch.ones(10), atol=1e-6)
    assert torch.allclose(q[torch.arange(10), y], F.softmax(zt / 4.0, -1)[torch.arange(10), y], atol=1e-6)
    s = F.normalize(weight, dim=1) @ F.normalize(weight, dim=1).T
    for i in range(10):  # off-true-class mass follows the similarity order
        others = [k for k in range(6) if k != y[i]]
        assert torch.equal(torch.argsort(q[i, others]), torch.argsort(s[y[i], others]))


def test_gradient_of_kl_is_softmax_minus_target():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q = F.softmax(torch.randn(4, 5, generator=g, dtype=torch.float64), -1)
    loss = (q * (q.log() - F.log_softmax(z, -1))).sum()  # Σ_b KL(q_b ‖ softmax(z_b))
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad, F.softmax(z, -1) - q, atol=1e-12)
    # with the temperature and T² factor, through the method's loss (batchmean):
    # ∂/∂z [T²·KL(q ‖ softmax(z/T))] / B = T·(softmax(z/T) − q) / B
    method = METHODS["ls"](alpha=1.0, temperature=3.0, epsilon=0.2)
    y = torch.tensor([0, 1, 2, 4])
    z32 = z.detach().float().requires_grad_(True)
    method.loss(ModelOutput(z32), None, y, torch.arange(4))["loss"].backward()
    q_ls = torch.full((4, 5), 0.2 / 4).scatter(1, y[:, None], 0.8)
    assert torch.allclose(z32.grad, 3.0 * (F.softmax(z32.detach() / 3.0, -1) - q_ls) / 4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Wiring: gradient flow, checkpoints, config errors, end-to-end runs.


def _module(name: str) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        student=MLP(4, (6,), hidden=(8,)),
        method=METHODS[name](),
        num_classes=4,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        teacher=MLP(4, (6,), hidden=(16,)),
    )


def test_similarity_buffer_is_checkpointed_and_loads_into_a_fresh_method():
    module = _module("kd_pt_sim")
    module.method.setup(module.student, module.teacher, None)
    state = module.state_dict()
    assert state["method.similarity"].shape == (4, 4)
    fresh = _module("kd_pt_sim")  # never set up: empty buffer
    fresh.load_state_dict(state)
    assert torch.equal(fresh.method.similarity, module.method.similarity)
    assert not module.method.similarity.requires_grad
    with pytest.raises(RuntimeError, match="setup"):
        METHODS["kd_sim"]().targets(Y, None, 3)


def test_bad_hyper_parameters_fail_clearly(tmp_path, cache_dir):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["method=kd_sim", "method.sim_temprature=0.1"], tmp_path, cache_dir)
    assert "sim_temprature" in f"{err.value} {err.value.__cause__}"
    for name, kwargs in (
        ("ls", {"epsilon": 1.5}),
        ("kd_sim", {"sim_temperature": 0.0}),
        ("kd_pt", {"target_temperature": -1.0}),
        ("kd_sim", {"true_mass": 0.0}),
        ("kd_pt_sim", {"alpha": 1.5}),
    ):
        with pytest.raises(ValueError, match=f"method.{next(iter(kwargs))}="):
            METHODS[name](**kwargs)


def test_configs_compose_with_defaults(tmp_path, cache_dir):
    for name in FAMILY:
        cfg = compose_train([f"method={name}"], tmp_path, cache_dir)
        method = instantiate(cfg.method)
        assert method.name == name and method.alpha == 0.9 and method.temperature == 4.0
        assert method.soft_target().diagnostics_by_default
        assert method.teacher_use.needs_teacher == (name != "ls")
