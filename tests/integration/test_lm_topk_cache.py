"""teacher.cache=topk: a causal LM teacher's top-k log-probs per position, stored compactly, verified,
rebuilt when damaged, and a cached forward-KL step equal to the live one when k covers the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdx.data.base import KDDataModule
from kdx.data.lm import BlockDataset
from kdx.errors import KDXError
from kdx.methods.base import METHODS
from kdx.models.adapter import as_feature_model
from kdx.models.base import LOGITS, ModelOutput
from kdx.models.causal_lm import causal_lm
from kdx.module import DistillationModule
from kdx.teacher_outputs import TeacherOutputCache, topk_bytes_per_token

VOCAB, BLOCK = 16, 8


class _Blocks(KDDataModule):
    input_kind, num_classes = "lm", VOCAB

    def __init__(self):
        super().__init__(batch_size=8)
        g = torch.Generator().manual_seed(0)
        lengths = torch.full((20,), BLOCK + 1)
        lengths[-1] = 4
        self.train_set = BlockDataset(torch.randint(0, VOCAB, (20, BLOCK + 1), generator=g), lengths)


def _teacher():
    torch.manual_seed(0)
    config = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16}
    return as_feature_model(causal_lm(config=config, vocab_size=VOCAB)).eval()


def _batch(data, index):
    items = [data.train_set[i] for i in index.tolist()]
    x = {k: torch.stack([it[0][k] for it in items]) for k in items[0][0]}
    return x, torch.stack([it[1] for it in items])


def test_cached_forward_kl_equals_the_live_teacher_when_k_covers_the_vocabulary(tmp_path):
    data, teacher = _Blocks(), _teacher()
    cache = TeacherOutputCache("topk", tmp_path, {"teacher": "gpt2"}, topk=VOCAB, batch_size=6)
    cache.prepare(teacher, frozenset({LOGITS}), data)
    assert (
        cache.status == "filled" and cache.info["bytes_per_token"] == topk_bytes_per_token(VOCAB, VOCAB) == 66
    )
    assert {a.dtype for a in cache.arrays.values()} == {np.dtype("float16"), np.dtype("int16")}
    index = torch.tensor([3, 19, 0])
    target = cache.output(cache.read(index, epoch=0))
    assert target.logits is None and target.topk.ids.shape == (3, BLOCK, VOCAB)
    x, y = _batch(data, index)
    student = torch.randn(3, BLOCK, VOCAB)
    with torch.no_grad():
        live = teacher(x)
    method = METHODS["fkl"]()
    cached_loss = method.loss(ModelOutput(student), target, y, index)["loss"]
    live_loss = method.loss(ModelOutput(student), live, y, index)["loss"]
    # equal up to the float16 storage of the log-probs
    assert float(cached_loss) == pytest.approx(float(live_loss), rel=2e-3)
    assert cache.info["topk_kl_mean"] < 1e-3  # nothing is lost but float16 rounding


def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path):
    data, teacher = _Blocks(), _teacher()
    first = TeacherOutputCache("topk", tmp_path, {"teacher": "gpt2"}, topk=4)
    first.prepare(teacher, frozenset({LOGITS}), data)
    assert first.info["topk_kl_mean"] > 0  # 4 of 16 tokens: the reconstruction loses something
    stored = first.path / "topk_logp.npy"
    raw = bytearray(stored.read_bytes())
    raw[-8:] = b"\x00" * 8
    stored.write_bytes(bytes(raw))
    second = TeacherOutputCache("topk", tmp_path, {"teacher": "gpt2"}, topk=4)
    second.prepare(teacher, frozenset({LOGITS}), data)
    assert second.status == "rebuilt" and "sha256" in second.problem
    assert list(tmp_path.glob("teacher_outputs/*.bad-*"))
    third = TeacherOutputCache("topk", tmp_path, {"teacher": "gpt2"}, topk=4)
    third.prepare(teacher, frozenset({LOGITS}), data)
    assert third.status == "reused"


def test_topk_needs_k_and_a_method_that_takes_a_sparse_target(tmp_path):
    with pytest.raises(KDXError, match="cache_topk"):
        TeacherOutputCache("topk", tmp_path, {})
    cache = TeacherOutputCache("topk", tmp_path, {}, topk=4)
    config = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 16}
    student = causal_lm(config=config, vocab_size=VOCAB)
    with pytest.raises(KDXError, match="temperature"):
        DistillationModule(
            student,
            METHODS["fkl"](temperature=2.0),
            VOCAB,
            torch.optim.SGD,
            teacher=_teacher(),
            teacher_cache=cache,
        )
    with pytest.raises(KDXError, match="scores the student.s own samples"):
        DistillationModule(
            student, METHODS["gkd"](), VOCAB, torch.optim.SGD, teacher=_teacher(), teacher_cache=cache
        )
