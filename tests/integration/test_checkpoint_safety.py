"""Unsafe checkpoints are named as such wherever kdx reads one, and nothing in them runs.

A payload pickle (its ``__reduce__`` calls ``os.system`` to create a marker file) is given to every
reader: the resume path ``ckpt_path``, ``teacher.ckpt``, ``kdx-eval`` (a run checkpoint and a plain
``.pt``) and the teacher-weights cache. Each says "holds Python objects besides tensors" in one line,
the CLI exits 2, the marker never appears, and torch's advice to load with ``weights_only=False``
reaches neither the console nor a record. The last test runs the documented ``kdx-eval`` teacher
command as the README writes it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import FAST, ROOT, compose_train, run_cli, run_train
from kdx.teacher import cached_teacher_path
from kdx.teacher.key import teacher_key

UNSAFE = "holds Python objects besides tensors"
ADVICE = "weights_only=False"


class Payload:
    """Unpickling this runs ``touch <marker>`` (a real payload would do worse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def save_payload(path: Path, marker: Path, lightning: bool = True) -> Path:
    """A file that looks like a checkpoint (a Lightning one, or plain weights) and carries a payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"w": torch.zeros(1), "payload": Payload(marker)}
    torch.save({"state_dict": state, "epoch": 1, "global_step": 4} if lightning else state, path)
    return path


def assert_refused(proc, marker: Path, reader: str, *records: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdx: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"{reader} checkpoint" in errors[0] and UNSAFE in errors[0], errors[0]
    assert ADVICE not in proc.stdout and ADVICE not in proc.stderr
    for record in records:
        assert ADVICE not in record.read_text()
    assert not marker.exists(), "the payload ran"


@pytest.mark.e2e
def test_a_payload_as_the_resume_checkpoint(tmp_path, cache_dir):
    marker = tmp_path / "ran"
    evil = save_payload(tmp_path / "evil.ckpt", marker)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "kdx-train", *FAST, f"ckpt_path={evil}", f"hydra.run.dir={run_dir}", root=tmp_path, cache=cache_dir
    )
    assert_refused(proc, marker, "resume (ckpt_path)", run_dir / "metrics.json")
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed" and UNSAFE in record["error"]
    assert not (run_dir / "checkpoints").exists()  # refused before any training


@pytest.mark.e2e
def test_a_payload_as_teacher_ckpt(tmp_path, cache_dir):
    marker = tmp_path / "ran"
    evil = save_payload(tmp_path / "evil.pt", marker, lightning=False)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "kdx-train", *FAST, f"teacher.ckpt={evil}", f"hydra.run.dir={run_dir}", root=tmp_path, cache=cache_dir
    )
    assert_refused(proc, marker, "teacher", run_dir / "metrics.json")
    assert UNSAFE in json.loads((run_dir / "metrics.json").read_text())["error"]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["run checkpoint", "plain weights"])
def test_a_payload_given_to_kdx_eval(tmp_path, cache_dir, kind):
    marker = tmp_path / "ran"
    if kind == "run checkpoint":  # inside a kdx run folder: evaluated with the run's own config
        run = tmp_path / "runs" / "r"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
        evil, args = save_payload(run / "checkpoints" / "best.ckpt", marker), []
        reader = "kdx-eval (ckpt_path)"
    else:
        evil, args, reader = save_payload(tmp_path / "evil.pt", marker, False), ["role=teacher"], "teacher"
    proc = run_cli("kdx-eval", f"ckpt_path={evil}", *args, root=tmp_path, cache=cache_dir)
    assert_refused(proc, marker, reader)
    assert not list(tmp_path.glob("logs/eval/**/eval.json"))


def test_a_payload_in_the_teacher_cache_is_moved_aside_and_retrained(tmp_path, capsys):
    cache = tmp_path / "cache"
    cfg = compose_train(FAST, tmp_path / "run", cache)
    model = instantiate(cfg.teacher.model)
    path = cached_teacher_path(cfg, model)
    marker = tmp_path / "ran"
    save_payload(path, marker, lightning=False)
    # a record with this recipe's key, so that the weights themselves are read (and refused)
    path.with_suffix(".json").write_text(json.dumps({"key": teacher_key(cfg, model)}, default=str))
    record = run_train(FAST, tmp_path / "run", cache)
    assert record["status"] == "ok" and record["teacher/source"] == "retrained"
    assert UNSAFE in record["teacher/retrained_because"]
    assert not marker.exists(), "the payload ran"
    err = capsys.readouterr().err
    assert f"cached teacher {path} is unusable: teacher checkpoint {path} {UNSAFE}" in err
    assert ADVICE not in err and ADVICE not in (tmp_path / "run" / "metrics.json").read_text()
    assert list(path.parent.glob(f"{path.stem}.bad-*.pt"))  # kept for a post-mortem


@pytest.mark.e2e
def test_the_documented_kdx_eval_teacher_command_works(tmp_path, cache_dir):
    (line,) = [
        line.split(" #", 1)[0].strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("kdx-eval ") and "role=teacher" in line
    ]
    cfg = compose_train(["ckpt_path=x"], tmp_path, cache_dir, config_name="eval")
    teacher = instantiate(cfg.teacher.model)  # the architecture the documented command names
    words = shlex.split(line)
    ckpt = re.sub(r"<[^>]*>", "cnn1d-0123", words[1].split("=", 1)[1])
    (tmp_path / ckpt).parent.mkdir(parents=True)
    torch.save(teacher.state_dict(), tmp_path / ckpt)
    args = [f"ckpt_path={ckpt}", *words[2:], "+trainer.limit_test_batches=2"]
    proc = run_cli(words[0], *args, root=tmp_path, cache=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (evaluation,) = tmp_path.glob("logs/eval/**/eval.json")
    result = json.loads(evaluation.read_text())
    assert result["model"] == "teacher" and result["ckpt"] == ckpt
    assert 0.0 <= result["acc"] <= 1.0
    assert f"teacher {ckpt} on mnist1d/test: acc" in proc.stdout
