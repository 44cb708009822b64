"""Every method in conf/method/ on text (experiment=text/synthetic, tiny BERTs, fast_dev_run): it
runs, or it refuses with a KDXError that names why. Plus bf16-mixed and the embedding space."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run_train
from kdx.cli import options
from kdx.errors import KDXError

# Tiny: 48 training reviews, an 80-token tokenizer, a 2-layer width-16 teacher (one auto-trained
# epoch of two batches, cached for the session) and a 1-layer width-8 student.
TEXT = [
    "experiment=text/synthetic",
    "debug=fdr",
    "logger=csv",
    "trainer.accelerator=cpu",
    "dataset.datamodule.num_train=48",
    "dataset.datamodule.num_val=16",
    "dataset.datamodule.num_test=16",
    "dataset.vocab_size=80",
    "dataset.datamodule.batch_size=8",
    "teacher.model.config.hidden_size=16",
    "teacher.model.config.intermediate_size=32",
    "student.model.config.hidden_size=8",
    "student.model.config.intermediate_size=16",
    "teacher.min_acc=0",
]
METHODS = options("method")
# Methods that may refuse this pair, and the reasons their message may give: feature-map methods
# need spatial axes (a transformer layer pooled over tokens is a vector), layer-pairing methods need
# as many picked layers (and, for fsp, equal widths) on both sides, backward's default space is
# the input tensor (text needs method.space=embedding).
LAYERS = "pairs student and teacher layers|needs feature maps|FSP matrices|hint_layer"
REFUSALS = {m: LAYERS for m in ("ab", "at", "fsp", "nst", "vid", "fitnet", "ft")}
REFUSALS["backward"] = "method.space=embedding"
REFUSALS["ab"] = LAYERS + "|method.features=stages"  # text models have no pre-activation stages
# token-level methods distil next-token distributions: a sequence classifier has none
REFUSALS.update({m: "use dataset=lm" for m in ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "gkd", "seqkd")})


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_text_or_refuses_clearly(method, tmp_path, cache_dir):
    try:
        metrics = run_train([*TEXT, f"method={method}"], tmp_path, cache_dir)
    except KDXError as err:
        reason = REFUSALS.get(method)
        assert reason is not None, f"method={method} refused text without a known reason: {err}"
        assert re.search(reason, str(err)), str(err)
        return
    assert metrics["status"] == "ok" and 0.0 <= metrics["student/acc"] <= 1.0
    assert "fidelity/kl" in metrics or metrics["teacher"] == "none"


def test_backward_in_embedding_space_and_kd_in_bf16(tmp_path, cache_dir):
    metrics = run_train([*TEXT, "method=backward", "method.space=embedding"], tmp_path / "bw", cache_dir)
    assert metrics["status"] == "ok" and "fidelity/agreement" in metrics
    metrics = run_train([*TEXT, "method=kd", "trainer.precision=bf16-mixed"], tmp_path / "bf16", cache_dir)
    assert metrics["status"] == "ok" and 0.0 <= metrics["fidelity/kl"] < 10.0
    assert Path(tmp_path / "bf16" / "metrics.json").is_file()
