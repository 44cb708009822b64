"""What a run prints: in a terminal (a pty, as ``script`` records it) no Lightning notice, no line
twice, no log line on the progress bar's line; through a pipe that closes early no traceback; the
console filter, job names and time estimates on their own."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from kdx.callbacks import _duration
from kdx.console import ConsoleFilter

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RUN = ["method=none", "teacher=none", "trainer.max_epochs=2", "print_summary=false"]


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("x", level, __file__, 1, message, None, None)


def test_the_console_filter_drops_routine_notices_and_names_the_job():
    quiet = ConsoleFilter()
    for notice in (
        "GPU available: False, used: False",
        "TPU available: False, using: 0 TPU cores",
        "`Trainer(limit_train_batches=1.0)` was configured so 100% of the batches per epoch will be used..",
        "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    ):
        assert not quiet.filter(record(notice)), notice
    assert quiet.filter(record("epoch 1/2; val/student/acc 50.00 %"))
    assert not ConsoleFilter(rank=1).filter(record("epoch 1/2"))  # DDP: rank 0 speaks
    assert ConsoleFilter(rank=1).filter(record("kdx: error: x", logging.ERROR))
    named = record("epoch 1/2")
    assert ConsoleFilter(job="job 3 method=kd seed=1").filter(named)
    assert named.getMessage() == "[job 3 method=kd seed=1] epoch 1/2"


def test_durations_read_as_a_person_says_them():
    assert [_duration(s) for s in (0.2, 40, 150, 3000, 7200)] == [
        "~1 s",
        "~40 s",
        "~2 min",
        "~50 min",
        "~2.0 h",
    ]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script for a pty")
def test_a_run_in_a_terminal_speaks_once_and_never_on_the_progress_bar(tmp_path, cache_dir):
    command = " ".join([str(Path(sys.executable).parent / "kdx-train"), *RUN])
    typescript = tmp_path / "typescript"
    env_prefix = f"KDX_ROOT_DIR={tmp_path} KDX_CACHE_DIR={cache_dir} OMP_NUM_THREADS=1 COLUMNS=200"
    proc = subprocess.run(
        ["script", "-qec", f"env {env_prefix} {command}", str(typescript)],
        capture_output=True,
        timeout=300,
        cwd=tmp_path,
    )
    text = typescript.read_bytes().decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Epoch 1/1" in text or "Epoch 0/1" in text  # the progress bar was live (a terminal)
    for notice in ("GPU available", "TPU available", "was configured", "Be aware that", "litlogger"):
        assert notice not in text, notice
    starts = [m.start() for m in re.finditer(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[", text)]
    assert len(starts) >= 3  # the data line and an epoch line per epoch
    for start in starts:
        # what is on the terminal's line when the log line starts: after the last newline and the
        # last carriage return, with rich's cursor moves and clears taken away — nothing
        line_so_far = text[text.rfind("\n", 0, start) + 1 : start].rsplit("\r", 1)[-1]
        assert ANSI.sub("", line_so_far).strip() == "", repr(text[start - 200 : start + 80])
    logged = [ANSI.sub("", text[s : text.find("\n", s)]).split("] - ", 1)[-1].strip() for s in starts]
    assert len(logged) == len(set(logged)), logged  # no line twice
    assert sum("epoch " in line for line in logged) == 2
    (log_file,) = tmp_path.glob("logs/**/train/runs/*/train.log")
    assert "GPU available" in log_file.read_text()  # kept in the run's log


@pytest.mark.slow
def test_a_run_piped_into_head_ends_without_a_traceback(tmp_path, cache_dir):
    tool = Path(sys.executable).parent / "kdx-train"
    proc = subprocess.run(
        f"{tool} {' '.join(RUN)} debug=fdr print_summary=true | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "KDX_ROOT_DIR": str(tmp_path), "KDX_CACHE_DIR": str(cache_dir)},
    )
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) <= 1
    assert list(tmp_path.glob("logs/**/train/runs/*/metrics.json"))  # the run went on to its results
    help_proc = run_cli("kdx-train", "--help", root=tmp_path, cache=cache_dir)
    assert help_proc.returncode == 0


@dataclass
class _Strategy:
    root_device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class _TrainerState:
    """What TimeEstimate reads from a Trainer, without running one."""

    num_training_batches: int
    max_epochs: int
    sanity_checking: bool = False
    is_global_zero: bool = True
    global_step: int = 0
    strategy: _Strategy = field(default_factory=_Strategy)


def _fake_trainer(steps_per_epoch: int, epochs: int) -> _TrainerState:
    return _TrainerState(num_training_batches=steps_per_epoch, max_epochs=epochs)


def _timed_steps(callback, trainer, seconds_per_step: float, steps: int, monkeypatch) -> None:
    monkeypatch.setattr("kdx.callbacks.time.perf_counter", lambda: trainer.global_step * seconds_per_step)
    for i in range(steps):
        trainer.global_step = i + 1
        callback.on_train_batch_end(trainer, None, None, None, i)


def test_a_teacher_run_says_how_long_it_will_take_once(monkeypatch, caplog):
    from kdx.callbacks import TimeEstimate

    trainer = _fake_trainer(steps_per_epoch=40, epochs=30)
    with caplog.at_level(logging.INFO, logger="kdx"):
        _timed_steps(TimeEstimate("teacher", "cnn1d", steps=4), trainer, 0.1, 12, monkeypatch)
    # 4 steps timed at 0.1 s; 30 x 40 - 5 steps left: ~120 s
    assert [r.getMessage() for r in caplog.records] == [
        "training teacher cnn1d for 30 epochs, ~2 min at this speed (cpu, 0.10 s a step)"
    ]


def test_a_long_run_is_a_warning_and_a_short_student_run_says_nothing(monkeypatch, caplog):
    from kdx.callbacks import TimeEstimate

    with caplog.at_level(logging.INFO, logger="kdx"):
        _timed_steps(TimeEstimate("train", "mlp", steps=4), _fake_trainer(40, 150), 0.01, 8, monkeypatch)
        assert not caplog.records
        _timed_steps(
            TimeEstimate("train", "resnet8x4", steps=4), _fake_trainer(782, 240), 1.0, 8, monkeypatch
        )
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(
        "kdx: warning: this run (resnet8x4, 240 epochs) will take ~52.1 h at this speed (cpu, 1.00 s a step)"
    )
