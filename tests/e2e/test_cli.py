"""The console scripts as a user runs them: exit codes, one-line errors, run folders, multirun, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # every test here launches a console script

BIN = Path(sys.executable).parent


def kdx(tool: str, *args: str, root: Path, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KDX_ROOT_DIR": str(root),
        "KDX_CACHE_DIR": str(cache),
        "HYDRA_FULL_ERROR": "0",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=root
    )


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("logs/**/metrics.json"))


def test_misspelt_key_exits_nonzero_naming_the_key(tmp_path, cache_dir):
    proc = kdx("kdx-train", "method.alpah=0.5", root=tmp_path, cache=cache_dir)
    assert proc.returncode != 0
    assert "alpah" in proc.stderr
    assert not run_dirs(tmp_path)  # nothing ran, nothing written


def test_missing_teacher_checkpoint_is_one_line_and_recorded(tmp_path, cache_dir):
    proc = kdx(
        "kdx-train", "debug=fdr", "teacher.ckpt=/nonexistent/teacher.pt", root=tmp_path, cache=cache_dir
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdx: error:")]
    assert len(errors) == 1 and "/nonexistent/teacher.pt" in errors[0] and "Traceback" not in proc.stderr
    (run,) = run_dirs(tmp_path)
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "failed" and "not found" in record["error"]
    assert not list(run.glob("**/*.tmp"))


def test_nan_loss_stops_with_a_clear_error(tmp_path, cache_dir):
    # T = 1e-45 overflows z/T to ±inf in float32, so the KD term is NaN at the first step
    proc = kdx("kdx-train", "debug=fdr", "method.temperature=1e-45", root=tmp_path, cache=cache_dir)
    assert proc.returncode == 2
    assert "kdx: error: the training loss became NaN or infinite" in proc.stderr
    assert "lower optim.optimizer.lr" in proc.stderr


def test_multirun_gives_one_folder_per_job(tmp_path, cache_dir):
    proc = kdx("kdx-train", "-m", "method=none,kd", "seed=0,1,2", "debug=fdr", root=tmp_path, cache=cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 6
    records = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert sorted((r["method"], r["seed"]) for r in records) == [
        (m, s) for m in ("kd", "none") for s in (0, 1, 2)
    ]
    assert all(r["status"] == "ok" for r in records)


def test_train_then_eval_the_checkpoint(tmp_path, cache_dir):
    proc = kdx("kdx-train", "debug=limit", "method=kd", root=tmp_path, cache=cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "student/acc" in proc.stdout  # the summary table
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = run / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    proc = kdx(
        "kdx-eval", f"ckpt_path={ckpt}", "+trainer.limit_test_batches=2", root=tmp_path, cache=cache_dir
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (evaluation,) = tmp_path.glob("logs/eval/**/eval.json")
    result = json.loads(evaluation.read_text())
    assert result["acc"] == pytest.approx(metrics["student/acc_best"])  # same weights, same two test batches


def test_ddp_sim_runs(tmp_path, cache_dir):
    proc = kdx("kdx-train", "trainer=ddp_sim", "debug=limit", root=tmp_path, cache=cache_dir, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "ok" and 0.0 <= record["student/acc"] <= 1.0


def test_bench_reports_both_sides(tmp_path, cache_dir):
    proc = kdx(
        "kdx-bench",
        "teacher=resnet8",
        "student=resnet8",
        "batch_size=8",
        "steps=2",
        "warmup_steps=1",
        "rounds=1",
        "num_classes=10",
        "variants=[]",
        "teacher.cache=exact",  # adds the cached side and its ceiling
        "overhead.enabled=false",  # tests/integration/test_speed.py runs the overhead section
        root=tmp_path,
        cache=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kdx_samples_per_s"] > 0 and result["plain_kd_samples_per_s"] > 0
    assert result["ratio_cached_over_plain_kd"] > 0
    assert result["ratio_cached_over_plain_precomputed"] == pytest.approx(
        result["cached_samples_per_s"] / result["plain_precomputed_samples_per_s"], rel=1e-2
    )
    assert result["ratio_kdx_over_plain_kd"] == pytest.approx(
        result["kdx_samples_per_s"] / result["plain_kd_samples_per_s"], rel=1e-2
    )
