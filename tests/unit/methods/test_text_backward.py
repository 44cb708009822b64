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


# Rows of unequal norm: id1 (3,4) has ‖e‖ = 5, id2 (0,2) has ‖e‖ = 2; the masked sentence norm is √29.
UNEQUAL = [[0, 0], [3, 4], [0, 2]]


def test_sentence_normalisation_moves_short_tokens_further():
    # step_scale=norm: g = (1,1) on both real tokens, ‖g‖ = 2 → δ_i = 0.2·√29·(1,1)/2 = 0.1·√29·(1,1),
    # ‖δ_i‖ = √0.58 on both tokens: 0.1523 of ‖e_1‖ = 5 but 0.3808 of ‖e_2‖ = 2. The sentence moves
    # by exactly η = 0.2; its tokens by 0.2666 on average and 0.3808 at most.
    student = TableModel(UNEQUAL)
    teacher = TableModel([[0, 0], [1, 0], [7, 7]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.2)
    perturb.setup(student, teacher)
    aux = perturb(IDS, linear_divergence((1.0, 0.0), (0.0, 1.0)))
    terms = perturb.move_terms(IDS, aux)
    per_token = math.sqrt(0.58)
    torch.testing.assert_close(terms["aux/move"], torch.tensor(0.2))
    torch.testing.assert_close(terms["aux/move_token"], torch.tensor((per_token / 5 + per_token / 2) / 2))
    torch.testing.assert_close(terms["aux/move_token_max"], torch.tensor(per_token / 2))


def test_token_normalisation_golden_step():
    # step_scale=token: each token moves η·‖e_i‖ along its own unit gradient (1,1)/√2:
    # δ_1 = 0.2·5/√2·(1,1) = (1/√2)(1,1), δ_2 = 0.2·2/√2·(1,1) = (0.4/√2)(1,1), padding 0. Every
    # token moves by exactly η of its norm, so the sentence does too.
    student = TableModel(UNEQUAL)
    teacher = TableModel([[0, 0], [1, 0], [7, 7]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.2, step_scale="token")
    perturb.setup(student, teacher)
    aux = perturb(IDS, linear_divergence((1.0, 0.0), (0.0, 1.0)))
    a, b = 1 / math.sqrt(2), 0.4 / math.sqrt(2)
    expected = torch.tensor([[[a, a], [b, b], [0.0, 0.0]]])
    torch.testing.assert_close(aux["__embedding_delta__"], expected)
    torch.testing.assert_close(aux["__teacher_embedding_delta__"], expected)  # shared tie: one δ
    terms = perturb.move_terms(IDS, aux)
    for key in ("aux/move", "aux/move_token", "aux/move_token_max"):
        torch.testing.assert_close(terms[key], torch.tensor(0.2))


def test_token_normalisation_sign_step_and_epsilon_ball():
    # sign step: c_i = ‖e_i‖/√d with d = 2 → each coordinate of token i moves η·‖e_i‖/√2
    student = TableModel(UNEQUAL)
    teacher = TableModel([[0, 0], [1, 0], [7, 7]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.2, step="sign", step_scale="token")
    perturb.setup(student, teacher)
    delta = perturb(IDS, linear_divergence((1.0, -1.0), (0.0, 0.0)))["__embedding_delta__"]
    a, b = 0.2 * 5 / math.sqrt(2), 0.2 * 2 / math.sqrt(2)
    torch.testing.assert_close(delta, torch.tensor([[[a, -a], [b, -b], [0.0, 0.0]]]))
    # three steps of 0.2 in an ε = 0.3 ball per token: each token stops at 0.3·‖e_i‖ (1.5 and 0.6)
    perturb = EmbeddingPerturbation(step_size=0.2, steps=3, epsilon=0.3, step_scale="token")
    perturb.setup(student, teacher)
    delta = perturb(IDS, linear_divergence((1.0, 0.0), (0.0, 1.0)))["__embedding_delta__"]
    torch.testing.assert_close(delta[0].norm(dim=-1), torch.tensor([1.5, 0.6, 0.0]))


def test_tie_student_leaves_the_teacher_input_clean():
    # tie=student with different widths: the student moves along its own gradient, δ_t = 0
    student = TableModel(UNEQUAL)
    teacher = TableModel([[0, 0, 0], [2, 0, 0], [0, 0, 2]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.2, step_scale="token", tie="student")
    perturb.setup(student, teacher)
    aux = perturb(IDS, linear_divergence((0.0, 1.0), (1.0, 0.0, 0.0)))
    torch.testing.assert_close(
        aux["__embedding_delta__"], torch.tensor([[[0.0, 1.0], [0.0, 0.4], [0.0, 0.0]]])
    )
    assert not aux["__teacher_embedding_delta__"].any()
    assert perturb.move_terms(IDS, aux)["aux/move_teacher"].item() == 0.0
    # the same width and ids would share one δ under tie=auto; tie=student still keeps the teacher clean
    same = TableModel([[0, 0], [1, 0], [7, 7]], prefix="teacher.")
    perturb.setup(student, same)
    assert not perturb(IDS, linear_divergence((0.0, 1.0), (1.0, 0.0)))["__teacher_embedding_delta__"].any()


def test_random_direction_control_has_the_same_length_and_no_backward_pass():
    def no_backward(batch):
        raise AssertionError("the random control must not run the models")

    student = TableModel(UNEQUAL)
    teacher = TableModel([[0, 0, 0], [2, 0, 0], [0, 0, 2]], prefix="teacher.")
    perturb = EmbeddingPerturbation(step_size=0.2, step_scale="token", direction="random")
    perturb.setup(student, teacher)
    torch.manual_seed(0)
    aux = perturb(IDS, no_backward)
    torch.testing.assert_close(aux["__embedding_delta__"][0].norm(dim=-1), torch.tensor([1.0, 0.4, 0.0]))
    # separate tie: the teacher's rows (norm 2) move 0.2·2 along their own random direction
    torch.testing.assert_close(
        aux["__teacher_embedding_delta__"][0].norm(dim=-1), torch.tensor([0.4, 0.4, 0.0])
    )


def test_neighbour_distance_golden():
    from kdx.methods.backward_embedding import neighbour_distance

    # rows (1,0), (0,1), (2,0) and an all-zero padding row (left out). Nearest other row / own norm:
    # (1,0) → (2,0) at 1, / 1 = 1; (0,1) → (1,0) at √2, / 1 = √2; (2,0) → (1,0) at 1, / 2 = 0.5.
    # The median of (1, √2, 0.5) is 1.
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    assert neighbour_distance(table) == pytest.approx(1.0)


def test_guard_refuses_an_extreme_move_and_warns_on_a_large_one(caplog):
    perturb = EmbeddingPerturbation(step_size=1.5, step_scale="token")

    def terms(mean, most):
        return {
            "aux/move_token": torch.tensor(mean),
            "aux/move_token_max": torch.tensor(most),
            "aux/neighbour": torch.tensor(0.86),
        }

    with pytest.raises(KDXError, match=r"method.step_size=1.5 .*lower method.step_size"):
        perturb.check(terms(1.5, 1.5))
    with caplog.at_level("WARNING"):
        perturb.check(terms(0.3, 1.2))
    assert "further than the median distance between neighbouring words" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # inside the neighbourhood, but where SST-2 students collapsed
        perturb.check(terms(0.15, 0.2))
    assert "collapsed the student to chance" in caplog.text and "neighbouring" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        perturb.check(terms(0.1, 0.1))
    assert caplog.text == ""


def test_input_space_refuses_the_text_only_settings():
    with pytest.raises(ValueError, match="step_scale=token"):
        BackwardPassKD(step_scale="token")
    with pytest.raises(ValueError, match="tie=student"):
        BackwardPassKD(tie="student")
    with pytest.raises(ValueError, match="method.tie"):
        BackwardPassKD(space="embedding", tie="both")


def text_batch():
    torch.manual_seed(1)
    x = {"input_ids": torch.randint(1, 40, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    x["attention_mask"][0, 4:] = 0
    return x, torch.tensor([0, 1, 2, 0]), torch.arange(4)


@pytest.mark.parametrize("control", [{"step_size": 0.0}, {"direction": "random"}])
def test_controls_run_on_text(control):
    student, teacher = tiny_pair()
    method = BackwardPassKD(space="embedding", **control)
    method.setup(student, teacher, None)
    terms = method.training_step(text_batch(), StepContext(student=student, teacher=teacher))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    if control.get("step_size") == 0.0:
        assert terms["aux/move"].item() == 0.0 and terms["aux/move_token"].item() == 0.0
    else:  # the random move has the length of the default step, per token
        step = method.perturb.step_size
        assert terms["aux/move_token"].item() == pytest.approx(step, rel=1e-5)
        assert terms["aux/move_token_max"].item() == pytest.approx(step, rel=1e-5)


def test_guard_fires_on_an_extreme_step_and_not_on_the_default(caplog):
    student, teacher = tiny_pair()
    ctx = StepContext(student=student, teacher=teacher)
    method = BackwardPassKD(space="embedding")
    method.setup(student, teacher, None)
    with caplog.at_level("WARNING"):
        terms = method.training_step(text_batch(), ctx)
    assert "neighbouring words" not in caplog.text
    assert 0 < terms["aux/move_token"].item() < terms["aux/neighbour"].item()
    extreme = BackwardPassKD(space="embedding", step_size=3.0)
    extreme.setup(student, teacher, None)
    with pytest.raises(KDXError, match="method.step_size=3 .* not sentences"):
        extreme.training_step(text_batch(), ctx)
