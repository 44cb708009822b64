"""experiment=prokt_glue/<task>: composes, builds with tiny local stand-in checkpoints, and each
ProKT step follows the official order (teacher step, then a student step on the updated teacher)
with both heads zero-initialised."""

from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from conftest import compose_train
from kdx.data.text import train_wordpiece
from kdx.methods.base import train_mode
from kdx.methods.prokt import ProKT
from kdx.pipeline.build import build

SENTENCES = ["a good film", "a bad film", "not good at all", "truly great", "awful and dull", "fine work"]


def stand_in(folder, hidden, layers, corpus):
    """A tiny random BertForSequenceClassification and a locally trained tokenizer in one folder."""
    torch.manual_seed(hidden)
    tokenizer = train_wordpiece(corpus, 60, folder)
    config = AutoConfig.for_model(
        "bert",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=2,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def prokt_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("prokt_glue")
    corpus = SENTENCES * 3
    teacher = stand_in(root / "bert-base-uncased", 16, 2, corpus)
    student = stand_in(root / "bert-6", 8, 1, corpus)
    (root / "glue" / "sst2").mkdir(parents=True)
    frame = pd.DataFrame({"sentence": SENTENCES, "label": [1, 0, 0, 1, 0, 1], "idx": range(6)})
    for split in ("train", "validation"):
        frame.to_parquet(root / "glue" / "sst2" / f"{split}-00000-of-00001.parquet")
    overrides = [
        "experiment=prokt_glue/sst2",
        f"dataset.root={root / 'glue'}",
        f"teacher.model.name_or_path={teacher}",
        f"student.model.name_or_path={student}",
        "dataset.datamodule.batch_size=3",
        "trainer.accelerator=cpu",
        "logger=csv",
    ]
    return compose_train(overrides, root / "out", root / "cache")


def test_recipe_is_the_official_one(prokt_cfg):
    cfg = prokt_cfg
    assert cfg.method.alpha == 1.0 and cfg.method.temperature == 1.0  # student: KL only, T = 1
    assert cfg.method.move_back_weight == 0.4 and cfg.method.zero_init_heads
    teacher_optim = cfg.method.teacher_optim
    assert teacher_optim.optimizer._target_ == "torch.optim.AdamW" and teacher_optim.optimizer.lr == 3e-5
    assert teacher_optim.scheduler._target_.endswith("LinearLR") and teacher_optim.scheduler.end_factor == 0.0
    assert teacher_optim.interval == "step"
    assert cfg.method.teacher_max_grad_norm == 1.0 and cfg.method.student_max_grad_norm == 1.0
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.optim.optimizer.lr == 1e-4
    assert cfg.dataset.num_classes == 2 and cfg.dataset.datamodule.max_length == 128
    assert cfg.trainer.max_epochs == 6 and cfg.published.verified is False


def test_step_order_and_zero_initialised_heads(prokt_cfg, monkeypatch):
    parts = build(prokt_cfg)
    module, datamodule, info = parts.module, parts.datamodule, parts.teacher_info
    assert module.method.teacher_use.trains_teacher and info["teacher/source"].startswith(
        "pre-trained weights of"
    )
    events: list[str] = []
    original_teacher_step, original_student_step = ProKT.teacher_step, ProKT.student_step

    def teacher_step(self, ctx, x, y, student_logits, optimizer):
        if not events:  # the first step: both heads are still all zeros, so the snapshot is uniform
            for model in (ctx.student, ctx.teacher):
                assert model.classifier.weight.abs().sum() == 0 and model.classifier.bias.abs().sum() == 0
            torch.testing.assert_close(student_logits, torch.zeros_like(student_logits))
        before = [p.detach().clone() for p in ctx.teacher.parameters()]
        terms = original_teacher_step(self, ctx, x, y, student_logits, optimizer)
        assert any(not torch.equal(a, p) for a, p in zip(before, ctx.teacher.parameters(), strict=True))
        events.append("teacher")
        return terms

    def student_step(self, ctx, x, y, teacher_logits, optimizer):
        # the target is the UPDATED teacher's eval-mode prediction on this batch
        with torch.no_grad(), train_mode(ctx.teacher, False):
            torch.testing.assert_close(teacher_logits, ctx.teacher(x).logits)
        events.append("student")
        return original_student_step(self, ctx, x, y, teacher_logits, optimizer)

    monkeypatch.setattr(ProKT, "teacher_step", teacher_step)
    monkeypatch.setattr(ProKT, "student_step", student_step)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,  # two batches (global_step counts both optimizers' steps)
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert events == ["teacher", "student", "teacher", "student"]
