"""Runs you can trust: trackers per job, failures explained, the teacher as a run of its own, one monitor."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_train, run_cli, run_train
from kdx.table import make_table
from kdx.teacher import cached_teacher_path

BIN = Path(sys.executable).parent
SMALL = ["debug=limit", "dataset=synthetic", "dataset.input_shape=[1,40]", "trainer.max_epochs=1"]


def kdx(*args: str, root: Path, cache: Path, timeout: int = 300, extra_env: dict | None = None):
    return run_cli("kdx-train", *args, root=root, cache=cache, timeout=timeout, extra_env=extra_env)


def sweep_jobs(root: Path) -> dict[int, Path]:
    (sweep,) = root.glob("logs/**/train/multiruns/*")
    return {int(p.name): p for p in sweep.iterdir() if p.name.isdigit()}


# -- tracking --------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb2

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""  # 7-byte file header ":W&B" + magic
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def wandb_run(job: Path) -> tuple[str, str, dict]:
    (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
    name = group = ""
    config: dict = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        updates = (
            record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        )
        if kind == "run":
            name, group = record.run.display_name, record.run.run_group
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return name, group, config


def tensorboard_hparams(job: Path) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found: dict = {}
    for events in job.glob("tensorboard/**/events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    found.update(
                        {
                            k: v.string_value or v.number_value
                            for k, v in data.session_start_info.hparams.items()
                        }
                    )
    return found


@pytest.mark.e2e
@pytest.mark.slow
def test_each_multirun_job_is_its_own_tracked_run(tmp_path, cache_dir):
    proc = kdx("-m", *SMALL, "method=none,kd", "seed=3", "logger=many,wandb", root=tmp_path, cache=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sweep_jobs(tmp_path)
    by_method = {}
    for job in jobs.values():
        record = json.loads((job / "metrics.json").read_text())
        by_method.setdefault(record["method"], []).append(job)
    wandb_jobs = [j for js in by_method.values() for j in js if (j / "wandb").is_dir()]
    runs = [wandb_run(job) for job in wandb_jobs]
    assert sorted(name for name, _, _ in runs) == ["kd-mlp-cnn1d-s3", "none-mlp-cnn1d-s3"]
    assert len({group for _, group, _ in runs}) == 1  # grouped by their sweep
    targets = {config["method"]["_target_"] for _, _, config in runs}
    assert targets == {"kdx.methods.none.NoDistillation", "kdx.methods.kd.KD"}
    assert all(config["seed"] == 3 for _, _, config in runs)
    tb_jobs = [j for j in jobs.values() if (j / "tensorboard").is_dir()]
    hparams = [tensorboard_hparams(job) for job in tb_jobs]
    assert sorted(h["method/_target_"] for h in hparams) == sorted(targets)
    assert all((job / "csv" / "hparams.yaml").is_file() for job in tb_jobs)


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_a_bug_in_one_job_keeps_its_traceback_and_the_sweep_goes_on(tmp_path, cache_dir):
    proc = kdx(
        "-m",
        *SMALL,
        "method=kd",
        "method._target_=kdx_faults.BugInStep,kdx.methods.kd.KD",
        root=tmp_path,
        cache=cache_dir,
    )
    jobs = sweep_jobs(tmp_path)
    bad, good = (json.loads((jobs[i] / "metrics.json").read_text()) for i in (0, 1))
    assert good["status"] == "ok"
    assert (
        bad["status"] == "failed" and bad["error_type"] == "RuntimeError" and "injected bug" in bad["error"]
    )
    log_text = Path(bad["log"]).read_text()
    assert "Traceback" in log_text and "kdx_faults.py" in log_text
    assert proc.returncode == 1 and "1 of 2 jobs failed (job 0)" in proc.stderr
    rows, _ = make_table([jobs[0].parent])
    assert sum(r["failed"] for r in rows) == 1 and sum(r["n"] for r in rows) == 1


@pytest.mark.e2e
@pytest.mark.slow
def test_a_bug_in_a_single_run_exits_1_with_the_traceback(tmp_path, cache_dir):
    proc = kdx(*SMALL, "method._target_=kdx_faults.BugInStep", root=tmp_path, cache=cache_dir)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: injected bug" in proc.stderr
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("logs/**/train/runs/*/metrics.json")]
    assert record["status"] == "failed" and record["error_type"] == "RuntimeError"


@pytest.mark.e2e
@pytest.mark.slow
def test_nan_on_one_ddp_rank_stops_both_with_one_message(tmp_path, cache_dir):
    started = time.monotonic()
    proc = kdx(
        "trainer=ddp_sim",
        *SMALL,
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=2",
        "method._target_=kdx_faults.NaNOnRankOne",
        root=tmp_path,
        cache=cache_dir,
        timeout=300,
    )
    assert time.monotonic() - started < 300  # no rank hangs in a collective
    assert proc.returncode == 2, proc.stderr[-3000:]
    messages = [line for line in proc.stderr.splitlines() if line.startswith("kdx: error:")]
    assert len(messages) == 2 and messages[0] == messages[1]  # both ranks, the same words
    assert "became NaN or infinite" in messages[0]


# -- the teacher is a run of its own ------------------------------------------------------------


def test_teacher_recipe_is_a_kdx_run_and_keyed_by_itself_alone(tmp_path, cache_dir):
    overrides = [*FAST, "teacher.train.method=ls", "teacher.train.seed=11"]
    first = run_train(overrides, tmp_path / "a", cache_dir)
    second = run_train(overrides, tmp_path / "b", cache_dir)
    assert (first["teacher/source"], second["teacher/source"]) == ("trained", "cache")
    path = cached_teacher_path(compose_train(overrides, tmp_path, cache_dir))
    teacher_run = json.loads((path.with_suffix("") / "metrics.json").read_text())
    assert teacher_run["status"] == "ok" and teacher_run["method"] == "ls"
    assert (
        teacher_run["config"]["task_name"] == "teacher" and teacher_run["config"]["teacher"]["name"] == "none"
    )
    # the student's trainer settings do not touch the teacher; the recipe's do
    for student_side in (
        ["trainer.precision=bf16-mixed"],
        ["trainer.gradient_clip_val=0.5"],
        ["trainer=ddp_sim"],
    ):
        assert cached_teacher_path(compose_train([*overrides, *student_side], tmp_path, cache_dir)) == path
    recipe_side = compose_train(
        [*overrides, "teacher.train.trainer.gradient_clip_val=1.0"], tmp_path, cache_dir
    )
    assert cached_teacher_path(recipe_side) != path


@pytest.mark.e2e
@pytest.mark.slow
def test_two_processes_share_one_auto_teacher(tmp_path):
    cache = tmp_path / "cache"
    args = [
        *SMALL,
        "teacher.train.epochs=15",
        "teacher.train.trainer.limit_train_batches=1.0",
        "teacher.train.seed=5",
    ]
    env = {"KDX_LOCK_NOTICE_S": "1"}

    def start(name: str) -> subprocess.Popen:
        (tmp_path / name).mkdir()
        full_env = {
            **os.environ,
            "KDX_ROOT_DIR": str(tmp_path / name),
            "KDX_CACHE_DIR": str(cache),
            "OMP_NUM_THREADS": "1",
            **env,
        }
        return subprocess.Popen(
            [str(BIN / "kdx-train"), *args],
            cwd=tmp_path / name,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # both start together: whichever reaches the lock first trains, the other waits for it
    first, second = start("a"), start("b")
    outputs = [p.communicate(timeout=400) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs[1][1][-2000:]
    records = [
        json.loads(next((tmp_path / n).glob("logs/**/train/runs/*/metrics.json")).read_text()) for n in "ab"
    ]
    assert sorted(r["teacher/source"] for r in records) == ["cache", "trained"]
    assert records[0]["teacher/sha256"] == records[1]["teacher/sha256"]
    waiting = next(err for (_, err), r in zip(outputs, records) if r["teacher/source"] == "cache")
    assert "waiting for teacher cnn1d: another process is training it" in waiting, [
        r["teacher/source"] for r in records
    ] + [o[1][:3000] for o in outputs]


# -- one monitor, checkpoints, kdx-eval -----------------------------------------------------------


def test_monitor_min_picks_the_epoch_with_the_lowest_kl(tmp_path, cache_dir):
    metrics = run_train(
        [*SMALL, "trainer.max_epochs=4", "monitor=val/fidelity/kl", "monitor_mode=min", "logger=csv"],
        tmp_path,
        cache_dir,
    )
    with open(tmp_path / "csv" / "metrics.csv") as f:
        kls = {
            int(r["epoch"]): float(r["val/fidelity/kl"])
            for r in csv.DictReader(f)
            if r.get("val/fidelity/kl")
        }
    best_epoch = min(kls, key=kls.get)
    assert metrics["monitor/best"] == pytest.approx(kls[best_epoch])
    best = torch.load(metrics["student/best_ckpt"], map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch


def test_checkpoints_hold_the_frozen_teacher_only_when_it_is_trained(tmp_path, cache_dir):
    metrics = run_train([*FAST, "debug=limit"], tmp_path, cache_dir)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in last["state_dict"])
    assert any(k.startswith("student.") for k in last["state_dict"])
    # an old checkpoint that still carries the teacher loads too
    from kdx.pipeline.build import build

    cfg = compose_train([*FAST, "debug=limit"], tmp_path / "again", cache_dir)
    module = build(cfg).module
    old = dict(last)
    old["state_dict"] = {
        **last["state_dict"],
        **{f"teacher.{k}": v for k, v in module.teacher.state_dict().items()},
    }
    module.on_load_checkpoint(old)
    module.load_state_dict(old["state_dict"])
    assert metrics["status"] == "ok"


@pytest.mark.e2e
@pytest.mark.slow
def test_kdx_eval_reproduces_a_non_default_run(tmp_path, cache_dir):
    run = kdx(*SMALL, "method=kd_pt", "student.model.hidden=[32]", "seed=4", root=tmp_path, cache=cache_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = tmp_path.glob("logs/**/train/runs/*")
    assert folder.name.endswith("_kd_pt_mlp_cnn1d_s4")
    record = json.loads((folder / "metrics.json").read_text())
    for ckpt, key in (("last.ckpt", "student/acc"), ("best.ckpt", "student/acc_best")):
        proc = run_cli(
            "kdx-eval", f"ckpt_path={folder / 'checkpoints' / ckpt}", root=tmp_path, cache=cache_dir
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(
            max(tmp_path.glob("logs/eval/runs/*/eval.json"), key=os.path.getmtime).read_text()
        )
        assert result["acc"] == pytest.approx(record[key], abs=1e-6)
        if ckpt == "last.ckpt":
            assert result["fidelity/kl"] == pytest.approx(record["fidelity/kl"], rel=1e-5)


def test_a_method_hyper_parameter_out_of_range_is_a_user_error(tmp_path, cache_dir):
    from kdx.errors import HyperParameterError

    with pytest.raises(HyperParameterError, match=r"method.temperature=-1.0 must be > 0"):
        run_train([*FAST, "method.temperature=-1"], tmp_path, cache_dir)
