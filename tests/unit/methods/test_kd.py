"""Hinton KD: a golden value derived by hand, gradient flow, and a teacher that never moves."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader

from kdx.data.base import tensor_dataset
from kdx.methods.kd import KD
from kdx.methods.none import NoDistillation
from kdx.models.base import ModelOutput
from kdx.models.small import CNN1D, MLP
from kdx.module import DistillationModule


def test_kd_golden_value_by_hand():
    # Two classes, T = 2, α = 0.5, label 0, student logits (0, 0), teacher logits (2·ln 3, 0).
    #   p_s^T = (1/2, 1/2);  p_t^T = softmax(ln 3, 0) = (3/4, 1/4)
    #   KL(p_t ‖ p_s) = 3/4·ln(3/2) + 1/4·ln(1/2);  the KD term is T²·KL = 4·KL
    #   CE(z_s, y=0) = ln 2
    #   loss = 0.5·ln 2 + 0.5·4·(3/4·ln 1.5 + 1/4·ln 0.5)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 0.5 * math.log(2) + 0.5 * 4 * kl
    student = ModelOutput(torch.zeros(2, 2))  # two identical rows: batchmean gives the per-row value
    teacher = ModelOutput(torch.tensor([[2 * math.log(3), 0.0]] * 2))
    terms = KD(alpha=0.5, temperature=2.0).loss(student, teacher, torch.tensor([0, 0]), torch.arange(2))
    assert math.isclose(terms["kd"].item(), 4 * kl, rel_tol=1e-6)
    assert math.isclose(terms["ce"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(terms["loss"].item(), expected, rel_tol=1e-6)


def test_kd_gradient_matches_closed_form():
    # ∂(T²·KL(p_t ‖ softmax(z/T)))/∂z = T·(softmax(z/T) − p_t), averaged over the batch
    torch.manual_seed(0)
    z_s = torch.randn(3, 5, requires_grad=True)
    z_t = torch.randn(3, 5)
    T = 3.0
    KD(alpha=1.0, temperature=T).loss(
        ModelOutput(z_s), ModelOutput(z_t), torch.zeros(3, dtype=torch.long), torch.arange(3)
    )["loss"].backward()
    expected = T * (torch.softmax(z_s.detach() / T, -1) - torch.softmax(z_t / T, -1)) / 3
    torch.testing.assert_close(z_s.grad, expected)


def test_none_is_plain_cross_entropy():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    terms = NoDistillation().loss(ModelOutput(logits), None, torch.tensor([1]), torch.arange(1))
    expected = -math.log(math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(0.5)))
    assert math.isclose(terms["loss"].item(), expected, rel_tol=1e-6)


def _fit(module, n=64, epochs=2):
    torch.manual_seed(0)
    data = tensor_dataset(torch.randn(n, 1, 40), torch.randint(0, 10, (n,)))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=32))
    return trainer


def test_validation_logs_fidelity_metrics():
    L.seed_everything(0, verbose=False)
    module = DistillationModule(
        student=MLP(10, (1, 40)),
        teacher=CNN1D(10, (1, 40)),
        method=KD(),
        num_classes=10,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    trainer = _fit(module, epochs=1)
    for key in (
        "val/student/acc",
        "val/teacher/acc",
        "val/fidelity/kl",
        "val/fidelity/agreement",
        "val/student/ece",
        "val/teacher/ece",
    ):
        assert key in trainer.callback_metrics, key
    assert trainer.callback_metrics["val/fidelity/kl"] >= 0
