"""Causal LMs as kdx models: per-position logits, one vocabulary shared with the data, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from kdx.errors import KDXError
from kdx.models.adapter import as_feature_model
from kdx.models.causal_lm import CausalLMFeatureModel, causal_lm

CONFIG = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 16}


def test_the_adapter_gives_logits_of_every_position():
    model = as_feature_model(causal_lm(num_classes=20, config=CONFIG, vocab_size=20))
    assert isinstance(model, CausalLMFeatureModel) and model.num_classes == 20
    ids = torch.randint(0, 20, (3, 5))
    out = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert out.logits.shape == (3, 5, 20) and out.embedding is None


def test_a_vocabulary_other_than_the_data_sets_is_one_clear_error(tmp_path):
    with pytest.raises(KDXError, match=r"vocabulary \(20\) differs from the data set's \(32\)"):
        causal_lm(num_classes=32, config=CONFIG, vocab_size=20)
    causal_lm(config=CONFIG, vocab_size=20).hf.save_pretrained(tmp_path)
    with pytest.raises(KDXError, match="must tokenise with the checkpoint's tokenizer"):
        causal_lm(name_or_path=str(tmp_path), vocab_size=32)
    assert causal_lm(num_classes=20, name_or_path=str(tmp_path)).vocab_size == 20
    with pytest.raises(KDXError, match="exactly one of"):
        causal_lm(config=CONFIG, name_or_path=str(tmp_path))


def test_sampling_repeats_with_its_generator_and_greedy_takes_the_argmax():
    torch.manual_seed(0)
    model = causal_lm(
        config={**CONFIG, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, vocab_size=20
    )
    prompt = torch.randint(0, 20, (2, 3))
    draw = lambda seed: model.sample(prompt, 4, torch.Generator().manual_seed(seed), top_k=5)  # noqa: E731
    assert torch.equal(draw(1), draw(1)) and draw(1).shape == (2, 7)
    assert torch.equal(draw(1)[:, :3], prompt)
    greedy = model.sample(prompt, 4, torch.Generator(), temperature=0.0)
    with torch.no_grad():
        logits = model.eval()(greedy[:, :-1])
    assert torch.equal(logits[:, 2:].argmax(-1), greedy[:, 3:])
