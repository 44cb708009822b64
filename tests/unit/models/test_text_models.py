"""Hugging Face sequence classifiers through kdx's adapter (kdx.models.hf): outputs, keys, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdx.errors import KDXError
from kdx.models.adapter import as_feature_model
from kdx.models.base import EMBEDDING, LOGITS, STAGES
from kdx.models.hf import HFFeatureModel, hf_model, select_inputs

TINY_BERT = dict(
    model_type="bert", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
)
ALL = (LOGITS, EMBEDDING, STAGES)


def tiny(num_classes=3, **kwargs):
    torch.manual_seed(0)
    return hf_model(num_classes, config=dict(kwargs.pop("config", TINY_BERT)), vocab_size=50, **kwargs)


def batch(ids, mask):
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def test_adapter_outputs_and_bert_embedding_is_the_pooler_output():
    model = tiny().eval()
    adapter = as_feature_model(model)
    assert isinstance(adapter, HFFeatureModel)
    assert adapter.classifier is model.hf.classifier and adapter.num_classes == 3
    x = batch([[2, 5, 7, 3], [2, 9, 3, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])
    out = adapter(x, ALL)
    assert out.logits.shape == (2, 3) and out.embedding.shape == (2, 16)
    assert len(out.stages) == 2 and all(s.shape == (2, 16) for s in out.stages)
    # BERT's classifier reads the pooler output tanh(W h_[CLS] + b) (dropout is off in eval)
    hf_out = model.hf.bert(**x)
    torch.testing.assert_close(out.embedding, hf_out.pooler_output)
    torch.testing.assert_close(out.logits, model.hf.classifier(hf_out.pooler_output))
    # logits alone: the plain forward, same numbers
    torch.testing.assert_close(adapter(x).logits, out.logits)


def test_stages_are_masked_means_over_tokens():
    model = tiny().eval()
    adapter = as_feature_model(model)
    x = batch([[2, 9, 3, 0, 0]], [[1, 1, 1, 0, 0]])
    out = adapter(x, ALL)
    hidden = model.hf(**x, output_hidden_states=True).hidden_states
    # the layer outputs (hidden_states[1:]), averaged over the 3 unmasked positions only
    for stage, h in zip(out.stages, hidden[1:], strict=True):
        torch.testing.assert_close(stage, h[:, :3].mean(1))
    # padding changes nothing: the same sentence without padding gives the same stages
    unpadded = adapter(batch([[2, 9, 3]], [[1, 1, 1]]), ALL)
    for a, b in zip(out.stages, unpadded.stages, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cls_and_unpooled_stages():
    x = batch([[2, 9, 3, 0]], [[1, 1, 1, 0]])
    cls = as_feature_model(tiny(stage_pooling="cls").eval())(x, ALL)
    full = as_feature_model(tiny(stage_pooling="none").eval())(x, ALL)
    assert full.stages[0].shape == (1, 4, 16)
    torch.testing.assert_close(cls.stages[0], full.stages[0][:, 0])


def test_roberta_and_distilbert_heads():
    roberta = dict(
        model_type="roberta",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        pad_token_id=1,
    )
    adapter = as_feature_model(tiny(config=roberta).eval())
    assert adapter.head_path == "classifier.out_proj"
    out = adapter(batch([[0, 5, 6, 2]], [[1, 1, 1, 1]]), ALL)
    assert out.embedding.shape == (1, 16)
    distil = dict(model_type="distilbert", dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    model = tiny(config=distil).eval()
    adapter = as_feature_model(model)
    x = batch([[2, 5, 3]], [[1, 1, 1]]) | {"token_type_ids": torch.zeros(1, 3, dtype=torch.long)}
    out = adapter(x, ALL)  # DistilBERT takes no token_type_ids: dropped, not an error
    assert adapter.head_path == "classifier" and out.logits.shape == (1, 3)


def test_decoder_embedding_is_the_last_non_padding_token():
    gpt2 = dict(model_type="gpt2", n_embd=16, n_layer=1, n_head=2, pad_token_id=0)
    model = tiny(config=gpt2).eval()
    adapter = as_feature_model(model)
    assert adapter.head_path == "score"
    x = batch([[5, 6, 7, 0], [5, 6, 0, 0]], [[1, 1, 1, 0], [1, 1, 0, 0]])
    out = adapter(x, ALL)
    last_hidden = model.hf(**x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.embedding, torch.stack([last_hidden[0, 2], last_hidden[1, 1]]))
    torch.testing.assert_close(out.logits, model.hf.score(out.embedding))


def test_each_model_reads_its_own_keys():
    student = as_feature_model(tiny().eval())
    teacher = as_feature_model(tiny(input_prefix="teacher.").eval())
    shared = batch([[2, 5, 3]], [[1, 1, 1]])
    # one shared tokenisation: the teacher falls back to the plain keys
    assert select_inputs(shared, "teacher.")["input_ids"] is shared["input_ids"]
    both = shared | {
        "teacher.input_ids": torch.tensor([[2, 7, 8, 3]]),
        "teacher.attention_mask": torch.ones(1, 4),
    }
    assert select_inputs(both, "teacher.")["input_ids"].shape == (1, 4)
    assert select_inputs(both, "")["input_ids"].shape == (1, 3)
    torch.testing.assert_close(teacher(both).logits, teacher(batch([[2, 7, 8, 3]], [[1, 1, 1, 1]])).logits)
    torch.testing.assert_close(student(both).logits, student(shared).logits)
    with pytest.raises(KDXError, match="mapping of tensors"):
        student([1, 2, 3])


def test_probe_and_bf16_autocast():
    adapter = as_feature_model(tiny())
    assert adapter.probe((12,)).embedding.shape == (2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(batch([[2, 5, 3]], [[1, 1, 1]]), ALL)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_pretrained_folder_round_trip_and_errors(tmp_path):
    model = tiny()
    model.hf.save_pretrained(tmp_path / "ckpt")
    loaded = hf_model(3, name_or_path=str(tmp_path / "ckpt"))
    x = batch([[2, 5, 3]], [[1, 1, 1]])
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    with pytest.raises(KDXError, match="exactly one of"):
        hf_model(3)
    with pytest.raises(KDXError, match="model_type"):
        hf_model(3, config={"hidden_size": 8})
    with pytest.raises(KDXError, match="does not download"):
        hf_model(3, name_or_path=str(tmp_path / "missing"))


def test_bare_transformers_model_is_wrapped():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**TINY_BERT, vocab_size=50, num_labels=2)
    adapter = as_feature_model(AutoModelForSequenceClassification.from_config(config).eval())
    assert isinstance(adapter, HFFeatureModel) and isinstance(adapter.classifier, nn.Linear)
    assert adapter(batch([[2, 5, 3]], [[1, 1, 1]]), ALL).embedding.shape == (1, 16)
