"""A run stopped by a real signal, a sweep stopped during a job, two runs on one folder: each a real
``kdx-train`` process. ``kdx_faults.SlowStep`` is KD slowed by 0.1 s a step, so the signal lands
mid-training; its figures are KD's."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SUPPORT

ARGS = [
    "debug=limit",
    "logger=csv",
    "method._target_=kdx_faults.SlowStep",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=20",
    "callbacks.diagnostics.enabled=false",
    "print_summary=false",
]


def _env(root: Path, cache: Path) -> dict:
    return {
        **os.environ,
        "KDX_ROOT_DIR": str(root),
        "KDX_CACHE_DIR": str(cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]),
    }


def _start(args: list[str], root: Path, cache: Path) -> subprocess.Popen:
    tool = str(Path(sys.executable).parent / "kdx-train")
    return subprocess.Popen(
        [tool, *args],
        env=_env(root, cache),
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def _interrupt(tmp_path: Path, cache_dir: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    proc = _start([*ARGS, f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)  # epoch 0 ended: the signal lands in epoch 1
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run_dir


def test_sigterm_is_interrupted_and_resumes_to_the_same_figures(tmp_path, cache_dir):
    done, run_dir = _interrupt(tmp_path, cache_dir, signal.SIGTERM)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted"
    assert record["interrupt/signal"] == "SIGTERM"
    assert record["epochs"] == 1
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert record["interrupt/ckpt"] == str(ckpt.resolve())
    assert record["interrupt/resume"] == f"kdx-train ckpt_path={ckpt.resolve()}"
    assert sum("interrupted by SIGTERM" in line for line in done.stderr.splitlines()) == 1
    assert "weights_only=False" not in done.stderr

    command = record["interrupt/resume"].split()
    resumed = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:]],
        env=_env(tmp_path, cache_dir),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["status"] == "ok" and after["resumed_from"] == str(ckpt.resolve())

    straight_dir = tmp_path / "straight"
    straight = _start([*ARGS, f"hydra.run.dir={straight_dir}"], tmp_path, cache_dir)
    assert straight.wait(timeout=300) == 0
    reference = json.loads((straight_dir / "metrics.json").read_text())
    for key in ("student/acc", "student/acc_best", "epochs", "steps"):
        assert after[key] == reference[key], key

    # the resumed run's CSV holds every epoch once: the same (epoch, step) rows as the straight run
    def rows(folder: Path) -> list[tuple[str, str]]:
        with (folder / "csv" / "metrics.csv").open() as f:
            return sorted((r["epoch"], r["step"]) for r in csv.DictReader(f))

    assert rows(run_dir) == rows(straight_dir)


def test_sigint_exits_130_with_a_record(tmp_path, cache_dir):
    done, run_dir = _interrupt(tmp_path, cache_dir, signal.SIGINT)
    assert done.returncode == 128 + signal.SIGINT, done.stderr[-2000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["interrupt/signal"] == "SIGINT"
    assert record["interrupt/resume"].startswith("kdx-train ckpt_path=")


def test_sweep_interrupted_during_job_0_reports_the_jobs_not_run(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = _start(["-m", *ARGS, "seed=0,1,2", f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir)
    _wait_for(sweep / "0" / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "interrupted"
    assert not (sweep / "1").exists()
    assert "not run: 1, 2" in err
    assert "seed=1" in err and "seed=2" in err


def test_two_runs_on_one_folder(tmp_path, cache_dir):
    run_dir = tmp_path / "shared"
    # long enough (8 epochs of 2 s) to outlive the second process's start
    first = _start([*ARGS, "trainer.max_epochs=8", f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", first)
    before = sorted(p.name for p in run_dir.rglob("*"))
    second = _start([*ARGS, "seed=1", f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"kdx: error: run folder {run_dir.resolve()} is in use by process {first.pid}")
    )
    assert first.wait(timeout=300) == 0
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok" and record["seed"] == 0
    assert "seed=1" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert before  # the first run had written its files; the second added none of its own
