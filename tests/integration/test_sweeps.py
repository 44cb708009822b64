"""Sweeps through Hydra's own plugins: Optuna search spaces, a real Optuna sweep, joblib multiruns
with failing jobs, and the SLURM (submitit) launcher configs. Subprocesses stay tiny (debug=limit)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

from conftest import CONF_DIR, ROOT
from kdx.cli import options
from kdx.table import make_table

KDX_TRAIN = str(Path(sys.executable).parent / "kdx-train")
SEARCHES = options("hparams_search")
METHODS = options("method")
# MNIST-1D-shaped synthetic data (made in memory), one epoch of 4 training batches (a checkpoint,
# so a best validation score for Optuna), one validation and one test batch
TINY = [
    "dataset=synthetic",
    "dataset.input_shape=[1,40]",
    "debug=limit",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def kdx_train(
    args: list[str], tmp_path: Path, cache_dir: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KDX_CACHE_DIR": str(cache_dir),
        "KDX_ROOT_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }
    return subprocess.run(
        [KDX_TRAIN, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def job_metrics(sweep_dir: Path) -> dict[int, dict | None]:
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    return {
        int(p.name): json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").exists() else None
        for p in jobs
    }


def test_every_method_with_a_teacher_has_a_search_space():
    assert "kd_optuna" in SEARCHES
    missing = {m for m in METHODS if m != "none"} - {s.removesuffix("_optuna") for s in SEARCHES}
    assert not missing, f"conf/hparams_search lacks <method>_optuna.yaml for {sorted(missing)}"


@pytest.mark.parametrize("search", SEARCHES)
def test_search_space_is_valid(search):
    """Seeded TPE, maximise; every parameter exists and both ends of its range build the method."""
    cfg = compose_with_hydra([f"hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.monitor == "val/student/acc"
    parser = OverridesParser.create()
    ends: tuple[list[str], list[str]] = ([], [])
    for key, value in sweeper.params.items():
        dist = create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))
        choices = getattr(dist, "choices", None)
        low, high = (choices[0], choices[-1]) if choices else (dist.low, dist.high)
        ends[0].append(f"{key}={low}")
        ends[1].append(f"{key}={high}")
    for overrides in ends:
        point = compose_with_hydra([f"hparams_search={search}", *overrides])
        instantiate(point.method)  # unknown keys, bad types and out-of-range values raise here


@pytest.mark.e2e
@pytest.mark.slow
def test_optuna_sweep_two_trials(tmp_path, cache_dir):
    sweep_dir = tmp_path / "optuna"
    result = kdx_train(
        ["hparams_search=kd_optuna", *TINY, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"method.temperature", "method.alpha"}
    assert 0.0 <= best["best_value"] <= 1.0
    jobs = job_metrics(sweep_dir)
    assert len(jobs) == 2 and all(m and m["status"] == "ok" for m in jobs.values())
    assert best["best_value"] == pytest.approx(max(m["student/val_acc_best"] for m in jobs.values()))
    trials = [yaml.safe_load((sweep_dir / str(i) / ".hydra" / "overrides.yaml").read_text()) for i in jobs]
    assert trials[0] != trials[1] and all(any(o.startswith("method.temperature=") for o in t) for t in trials)


@pytest.mark.e2e
@pytest.mark.slow
def test_joblib_multirun_with_failing_jobs(tmp_path, cache_dir):
    """Three jobs on two joblib workers: a good lr, lr=1e30 (the loss turns NaN), lr=-1 (the optimizer raises).

    The NaN job writes ``status: failed`` into its run folder and returns -inf, so the sweep goes
    on; the good job finishes either way; kdx-table counts one success and two failures."""
    sweep_dir = tmp_path / "joblib"
    result = kdx_train(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *TINY,
            "optim.optimizer.lr=0.01,1e30,-1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
        cache_dir,
    )
    assert "Joblib" in result.stdout + result.stderr
    jobs = job_metrics(sweep_dir)
    assert set(jobs) == {0, 1, 2}
    assert jobs[0]["status"] == "ok" and 0.0 <= jobs[0]["student/acc_best"] <= 1.0
    assert jobs[1]["status"] == "failed" and "NaN" in jobs[1]["error"]
    assert {"seed", "method", "dataset", "teacher", "student"} <= set(jobs[1])
    # lr=-1 raises inside Lightning: a failed job, whether or not train.py catches that kind of error
    assert jobs[2]["status"] == "failed" and "learning rate" in jobs[2]["error"]
    # every job ran, then the multirun says which failed and exits non-zero
    assert result.returncode == 1 and "2 of 3 jobs failed (job 1, 2)" in result.stderr
    rows, markdown = make_table([sweep_dir])
    (row,) = rows
    assert row["n"] == 1 and row["failed"] + row["missing"] == 2 and row["failed"] >= 1
    assert not math.isnan(row["student/acc_best_mean"]) and "NaN or infinite" in markdown


@pytest.mark.e2e
def test_submitit_slurm_launcher_composes(tmp_path):
    env = {**os.environ, "KDX_ROOT_DIR": str(tmp_path)}
    result = subprocess.run(
        [KDX_TRAIN, "--cfg", "hydra", "hydra/launcher=submitit_slurm"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in result.stdout


def test_slurm_ddp_launcher_follows_the_trainer():
    cfg = compose_with_hydra(
        [
            "hydra/launcher=slurm_ddp",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "trainer.devices=4",
            "hydra.launcher.partition=gpu",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and cfg.trainer.strategy == "ddp"
