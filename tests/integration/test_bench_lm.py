"""kdx-bench's language-model pair reports its fields (figures never asserted: the machine decides them)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from kdx.bench import PAIRS
from kdx.bench_lm import lm_table, timed_blocks
from kdx.data.lm import BlockDataset


def test_the_lm_pair_reports_speed_ratios_and_the_topk_error_per_k(tmp_path):
    lm = OmegaConf.load(ROOT / "conf" / "bench.yaml").lm
    lm.merge_with(
        {
            "vocab_size": 64,
            "block_size": 8,
            "batch_size": 8,
            "documents": 60,
            "teacher_steps": 2,
            "student_steps": 1,
            "topk": [4, 64],
            "cache_topk": 4,
            "steps": 4,
            "rounds": 2,
        }
    )
    cfg = OmegaConf.create({"seed": 0, "accelerator": "cpu", "warmup_steps": 1, "lm": lm})
    # through the pair protocol kdx-bench calls (kdx.bench.PAIRS): bench(cfg, device), table(result)
    result = PAIRS["lm"].bench(cfg, torch.device("cpu"))
    assert PAIRS["lm"].table(result) == lm_table(result)
    assert result["ratio_kdx_over_plain"] > 0 and result["ratio_cached_over_live"] > 0
    assert result["ratio_lightning_over_plain"] > 0 and result["ratio_kdx_over_lightning"] > 0
    assert result["steps_per_segment"] == 4
    # per step: a side's added milliseconds are its step minus the plain loop's; one ratio per round
    for side in ("lightning", "kdx"):
        assert result[f"added_ms_{side}"] == pytest.approx(
            result[f"step_ms_{side}"] - result["step_ms_plain"], abs=1e-3
        )
        assert len(result[f"rounds_{side}"]) == 2
    assert "per step: plain loop" in lm_table(result)
    by_k = {row["k"]: row for row in result["topk"]}
    assert by_k[4]["bytes_per_token"] == 4 * 4 + 2 and by_k[64]["full_fp32_bytes_per_token"] == 256
    # k = the vocabulary: nothing lost but float16 rounding
    assert by_k[64]["reconstruction_kl"] < 1e-3 and by_k[64]["student_loss_rel_diff"] < 1e-2
    assert by_k[4]["reconstruction_kl"] > by_k[64]["reconstruction_kl"]
    assert "top-4 cache" in lm_table(result)


def test_the_timed_blocks_cycle_through_a_corpus_shorter_than_the_segment():
    blocks = torch.arange(3 * 5).reshape(3, 5)
    timed = timed_blocks(BlockDataset(blocks, torch.tensor([5, 4, 3])), 7)
    assert timed.blocks[:, 0].tolist() == [0, 5, 10, 0, 5, 10, 0]
    assert timed.lengths.tolist() == [5, 4, 3, 5, 4, 3, 5]
