"""Run validation keeps language models, language-modelling data and token-level methods together."""

from __future__ import annotations

import pytest

from conftest import FAST, compose_train
from kdx.errors import KDXError
from kdx.pipeline.validate import validate_config


def _validate(overrides, tmp_path):
    validate_config(
        compose_train([*FAST, *overrides], tmp_path, tmp_path / "cache"), overrides=[], reference=None
    )


@pytest.mark.parametrize("method", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "gkd", "seqkd", "none"])
def test_the_lm_experiment_composes_and_validates_with_every_token_method(tmp_path, method):
    _validate(["experiment=lm/synthetic", f"method={method}"], tmp_path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["experiment=lm/synthetic", "method=kd"],
            r"^method=kd distils classifiers, but dataset=lm_synthetic is language",
        ),
        (["method=fkl"], r"^method=fkl distils a causal language model token by token, but dataset=mnist1d"),
        (["experiment=lm/synthetic", "student=mlp"], r"^student=mlp is not a causal language model"),
        (
            ["student=gpt2_l1_h32", "method=none", "teacher=none"],
            r"^student=gpt2_l1_h32 is a causal language model, but",
        ),
    ],
)
def test_mismatched_models_methods_and_data_are_one_line_before_any_work(tmp_path, overrides, match):
    with pytest.raises(KDXError, match=match):
        _validate(overrides, tmp_path)
