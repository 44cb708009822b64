"""Backward-pass KD in embedding space (method=backward method.space=embedding): golden steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdx.context import StepContext
from kdx.errors import KDXError
from kdx.methods.backward import PERTURBATIONS, BackwardPassKD
from kdx.methods.backward_embedding import EmbeddingPerturbation
from kdx.models.adapter import as_feature_model
from kdx.models.hf import hf_model


class TableModel(nn.Module):
    """Just an embedding table and a key prefix: what the perturbation reads from a model."""

    def __init__(self, rows, prefix=""):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.tensor(rows, dtype=torch.float32), freeze=False)
        self.input_prefix = prefix

    def input_embeddings(self):
        return self.table


IDS = {"input_ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}


def linear_divergence(a, b):
    """D = Σ_tokens a·(E_s+δ_s) + b·(E_t+δ_t): the gradient is a (student) and b (teacher) per token."""

    def d(batch):
        s = (batch["inputs_embeds"] * torch.tensor(a)).sum((1, 2))
        t = (batch["teacher.inputs_embeds"] * torch.tensor(b)).sum((1, 2))
        return s + t

    return d


def test_registered_as_a_space():
    assert PERTURBATIONS["embedding"] is EmbeddingPerturbation
    with pytest.raises(ValueError, match="clamp"):
        BackwardPassKD(space="embedding", clamp_min=0.0)
    with pytest.raises(ValueError, match="online"):
        BackwardPassKD(space="embedding", mode="offline")


def test_shared_tie_golden_step():
    # Same ids, same width → one δ for both. Student rows: pad (0,0), id1 (3,4), id2 (0,5); the
    # masked norm of E_s is s = √(9+16+25) = √50. ∇_δ D = a + b = (1,0) + (0,1) = (1,1) on the two
    # real tokens, 0 on padding, so ‖g‖ = 2 and δ = η·s·g/‖g‖ = 0.2·√50/2·(1,1) = (√0.5, √0.5).
    student = TableModel([[0, 0], [3, 4], [0, 5]])
    teacher = TableModel([[0, 0], [1, 0], [7, 7]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.2)
    perturb.setup(student, teacher)
    aux = perturb(IDS, linear_divergence((1.0, 0.0), (0.0, 1.0)))
    r = math.sqrt(0.5)
    expected = torch.tensor([[[r, r], [r, r], [0.0, 0.0]]])
    torch.testing.assert_close(aux["__embedding_delta__"], expected)
    torch.testing.assert_close(aux["__teacher_embedding_delta__"], expected)
    # aux/move = ‖δ‖/‖E_s‖ = √(4·0.5)/√50 = 0.2 = η
    torch.testing.assert_close(aux["__move__"], torch.tensor(0.2))
    joined = perturb.join(IDS, aux)
    # clean rows first (the plain lookups), then the moved ones; teacher keys prefixed
    torch.testing.assert_close(joined["inputs_embeds"][0], student.table(IDS["input_ids"])[0])
    torch.testing.assert_close(joined["inputs_embeds"][1], student.table(IDS["input_ids"])[0] + expected[0])
    torch.testing.assert_close(
        joined["teacher.inputs_embeds"][1], teacher.table(IDS["input_ids"])[0] + expected[0]
    )
    assert joined["teacher.attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0]]


def test_sign_step_and_epsilon_ball():
    # sign step: c = s/√n with n = 2 tokens × 2 dims = 4 → c = √50/2; each coordinate moves η·c·sign(g)
    student = TableModel([[0, 0], [3, 4], [0, 5]])
    teacher = TableModel([[0, 0], [1, 0], [7, 7]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.2, step="sign")
    perturb.setup(student, teacher)
    delta = perturb(IDS, linear_divergence((1.0, -1.0), (0.0, 0.0)))["__embedding_delta__"]
    c = 0.2 * math.sqrt(50) / 2
    torch.testing.assert_close(delta, torch.tensor([[[c, -c], [c, -c], [0.0, 0.0]]]))
    # three normalized steps of η = 0.2 inside an ε = 0.3 ball: the move stops at 0.3·s
    perturb = EmbeddingPerturbation(step_size=0.2, steps=3, epsilon=0.3)
    perturb.setup(student, teacher)
    delta = perturb(IDS, linear_divergence((1.0, 0.0), (0.0, 1.0)))["__embedding_delta__"]
    torch.testing.assert_close(delta.norm(), torch.tensor(0.3 * math.sqrt(50)))


def test_separate_tie_when_widths_differ():
    # teacher width 3 ≠ 2: each side moves along its own gradient with its own scale.
    # student: g_s = a = (0,2) per token → unit (0,1)/√2 per token; s_s = √50 → δ_s = 0.1·√50·(0,1/√2) = (0, 0.5)
    # teacher rows id1 (2,0,0), id2 (0,0,2): s_t = √8; g_t = b = (1,0,0) → δ_t = 0.1·√8·(1/√2,0,0) = (0.2, 0, 0)
    student = TableModel([[0, 0], [3, 4], [0, 5]])
    teacher = TableModel([[0, 0, 0], [2, 0, 0], [0, 0, 2]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.1)
    perturb.setup(student, teacher)
    aux = perturb(IDS, linear_divergence((0.0, 2.0), (1.0, 0.0, 0.0)))
    torch.testing.assert_close(
        aux["__embedding_delta__"], torch.tensor([[[0.0, 0.5], [0.0, 0.5], [0.0, 0.0]]])
    )
    torch.testing.assert_close(
        aux["__teacher_embedding_delta__"], torch.tensor([[[0.2, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0] * 3]])
    )


def test_refuses_models_without_word_embeddings_and_same_prefix():
    perturb = EmbeddingPerturbation()
    with pytest.raises(KDXError, match="not a Hugging Face text model"):
        perturb.setup(nn.Linear(2, 2), TableModel([[0, 0]]))
    with pytest.raises(KDXError, match="input_prefix=teacher"):
        perturb.setup(TableModel([[0, 0]]), TableModel([[0, 0]]))


def tiny_pair():
    config = dict(
        model_type="bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    student = as_feature_model(hf_model(3, config=config, vocab_size=40))
    teacher = as_feature_model(hf_model(3, config=config, vocab_size=40, input_prefix="teacher."))
    teacher.requires_grad_(False).eval()
    return student, teacher


def test_real_models_move_uphill_and_the_teacher_gets_no_gradient():
    student, teacher = tiny_pair()
    method = BackwardPassKD(space="embedding", step_size=0.05, temperature=1.0)
    method.setup(student, teacher, None)
    ctx = StepContext(student=student, teacher=teacher)
    x = {"input_ids": torch.randint(1, 40, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    x["attention_mask"][0, 4:] = 0
    aux = method.generate(ctx, x)
    assert all(p.grad is None for p in student.parameters())  # generation touches no parameter
    assert (aux["__embedding_delta__"][0, 4:] == 0).all()  # no move on padding
    with torch.no_grad():
        student.eval()
        joined = method.perturb.join(x, aux)
        from kdx.methods.backward import divergence

        d = divergence(student(joined).logits, teacher(joined).logits, 1.0)
    assert (d[4:] > d[:4]).all()  # every sample's divergence grew along the gradient
    student.train()
    terms = method.training_step((x, torch.tensor([0, 1, 2, 0]), torch.arange(4)), ctx)
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.input_embeddings().weight.grad is not None  # the lookups of both parts are the student's
