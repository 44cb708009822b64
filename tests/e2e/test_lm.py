"""Language-model distillation from the console: a 2×2 multirun (two token-level methods × two seeds) on
a small generated corpus, read back by kdx-table with perplexity and Welch's t against a method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kdx.table import make_table

KDX_TRAIN = str(Path(sys.executable).parent / "kdx-train")
# a small corpus and short training: real runs (no limit_* batches, full validation), so the table
# keeps them; small batches give the students enough steps to beat the most frequent token (the
# chance level a run is judged against)
SMALL = [
    "experiment=lm/synthetic",
    "dataset.datamodule.num_train=300",
    "dataset.datamodule.batch_size=8",
    "dataset.datamodule.num_val=40",
    "dataset.datamodule.num_test=40",
    "trainer.max_epochs=2",
    "teacher.train.epochs=2",
    "print_summary=false",
]


def test_a_2x2_multirun_of_token_methods_feeds_kdx_table(tmp_path):
    env = {
        **os.environ,
        "KDX_CACHE_DIR": str(tmp_path / "cache"),
        "KDX_ROOT_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [KDX_TRAIN, "-m", *SMALL, "method=fkl,jsd", "seed=0,1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    for record in records:
        assert record["student/ppl"] > 1 and record["teacher/ppl"] > 1 and record["fidelity/kl"] >= 0
    rows, markdown = make_table([sweep], figure=False, versus="fkl", metric="student/ppl_best")
    assert sorted(r["method"] for r in rows) == ["fkl", "jsd"] and all(r["n"] == 2 for r in rows)
    assert "student ppl" in markdown and "teacher ppl" in markdown and "Δ vs fkl" in markdown
