"""The run record (metrics.json): round trips, older records, strict JSON, and what is not a record."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from kdx.record import SCHEMA_VERSION, RecordError, RunRecord, read_record, write_record

# every key a successful kdx-train run writes, with the values of a real MNIST-1D KD run
OK_RECORD = {
    "status": "ok",
    "seed": 1,
    "method": "kd",
    "label": "kd-t4",
    "dataset": "mnist1d",
    "teacher": "cnn1d",
    "student": "mlp",
    "choices": {"dataset": "mnist1d", "method": "kd", "student": "mlp", "teacher": "cnn1d"},
    "tags": ["smoke"],
    "published": {"metric": "student/acc_best", "student": {"kd": 74.9}},
    "config": {"seed": 1, "method": {"temperature": 4.0}},
    "versions": {"kdx": "0.4.0", "torch": "2.5.1"},
    "monitor": "val/student/acc",
    "monitor_mode": "max",
    "monitor/best": 0.71,
    "student/val_acc_best": 0.71,
    "time/fit_s": 12.5,
    "epochs": 3,
    "steps": 120,
    "warnings": ["student=mlp is larger than teacher=cnn1d"],
    "student/acc": 0.69,
    "student/acc_best": 0.70,
    "student/best_ckpt": "/runs/0/checkpoints/best.ckpt",
    "student/ece": 0.05,
    "student/mcc": 0.41,
    "student/mcc_best": 0.43,
    "student/f1": 0.81,
    "student/f1_best": 0.83,
    "init/epochs": 30,
    "init/lr": 0.01,
    "teacher/acc": 0.80,
    "teacher/ece": 0.04,
    "fidelity/agreement": 0.81,
    "fidelity/kl": 0.33,
    "fidelity/kernel_gap": 0.2,
    "fidelity/cka": 0.9,
    "fidelity/agreement_best": 0.83,
    "fidelity/kl_best": 0.4,
    "fidelity/kernel_gap_best": 0.25,
    "fidelity/cka_best": 0.88,
    "student/ece_best": 0.04,
    "throughput/train_samples_per_s": 5000.0,
    "teacher/sha256": "a" * 64,
    "teacher/name": "cnn1d",
    "teacher/source": "retrained",
    "teacher/ckpt": "/cache/teachers/cnn1d-0123.pt",
    "teacher/val_acc": 0.82,
    "teacher/retrained_because": "it was trained with other model code",
    "data/examples": {"train": 4000, "val": 400, "test": 1100},
    "data/batching": "length_grouped",
    "teacher_cache/status": "rebuilt",
    "teacher_cache/problem": "logits.npy fails its sha256 checksum",
    "teacher_cache/bytes_per_token": 130,
    "teacher_cache/topk_kl": 0.001,
    "student/ppl": 2.6,
    "student/ppl_best": 2.55,
    "teacher/ppl": 2.5,
    "resumed_from": "/runs/kd/checkpoints/last.ckpt",
    "diag/sim_corr": 0.5,
    "diag/p_t_true_q50": 0.9,
}
# what only an interrupted run's record holds
INTERRUPT_FIELDS = {
    "interrupt/signal": "SIGTERM",
    "interrupt/ckpt": "/runs/kd/checkpoints/last.ckpt",
    "interrupt/resume": "kdx-train ckpt_path=/runs/kd/checkpoints/last.ckpt",
}
FAILED_RECORD = {
    "status": "failed",
    "seed": "abc",  # the run failed on this very seed: it is recorded as given
    "method": "kd",
    "label": None,
    "dataset": "mnist1d",
    "teacher": "cnn1d",
    "student": "mlp",
    "choices": {"method": "kd"},
    "tags": [],
    "published": None,
    "config": {"seed": "abc"},
    "versions": {"kdx": "0.4.0"},
    "error": "seed='abc' is not an integer; pass seed=<int>",
    "error_type": "KDXError",
    "log": None,
}


def test_a_record_with_every_field_round_trips():
    record = RunRecord.from_dict(OK_RECORD)
    known = [
        f.name
        for f in dataclasses.fields(RunRecord)
        if f.name
        not in (
            "extra",
            "error",
            "error_type",
            "log",
            "interrupt_signal",
            "interrupt_ckpt",
            "interrupt_resume",
        )
    ]
    assert all(getattr(record, name) is not None for name in known), "OK_RECORD misses a field"
    assert record.student_acc == 0.69 and record.fit_s == 12.5 and record.teacher_sha256 == "a" * 64
    assert record.extra == {"diag/sim_corr": 0.5, "diag/p_t_true_q50": 0.9}
    assert record.to_dict() == {**OK_RECORD, "schema_version": SCHEMA_VERSION}
    assert RunRecord.from_dict(record.to_dict()) == record
    failed = RunRecord.from_dict(FAILED_RECORD)
    assert failed.to_dict() == {**FAILED_RECORD, "schema_version": SCHEMA_VERSION}
    assert not failed.ok and failed.seed == "abc"
    interrupted = {**FAILED_RECORD, "status": "interrupted", "seed": 1, **INTERRUPT_FIELDS}
    assert RunRecord.from_dict(interrupted).to_dict() == {**interrupted, "schema_version": SCHEMA_VERSION}


def test_each_outcome_writes_its_keys_and_only_measured_figures():
    ok = RunRecord(status="ok", seed=0, method="none").to_dict()
    assert ok["label"] is None and ok["teacher/sha256"] is None and ok["monitor/best"] is None
    assert "student/acc" not in ok and "teacher/acc" not in ok and "error" not in ok
    failed = RunRecord(status="diverged", seed=0, error="loss is NaN", error_type="DivergenceError").to_dict()
    assert failed["log"] is None and "time/fit_s" not in failed and "warnings" not in failed
    # a run that finished at chance: the keys of both outcomes, its figures kept
    at_chance = RunRecord(status="no_learning", seed=0, method="none", student_acc=0.509)
    written = at_chance.to_dict()
    assert written["monitor/best"] is None and written["error"] is None and written["student/acc"] == 0.509
    assert at_chance.finished and not at_chance.ok and not RunRecord(status="failed").finished


def test_a_record_without_schema_version_reads():
    older = {
        k: v
        for k, v in OK_RECORD.items()
        if k not in ("versions", "label", "teacher/val_acc", "fidelity/cka")
    }
    record = RunRecord.from_dict(older)
    assert record.student_acc_best == 0.70 and record.versions is None and record.label is None
    assert record.get("fidelity/cka") is None and record.get("fidelity/cka", 0.0) == 0.0
    assert record.to_dict()["schema_version"] == SCHEMA_VERSION
    with pytest.raises(RecordError, match="newer than this kdx reads"):
        RunRecord.from_dict({**OK_RECORD, "schema_version": SCHEMA_VERSION + 1})


def test_unknown_keys_round_trip_through_extra(tmp_path):
    record = RunRecord.from_dict({"status": "ok", "seed": 0, "diag/q_true_mean": 0.4, "my/figure": [1, 2]})
    assert record.extra == {"diag/q_true_mean": 0.4, "my/figure": [1, 2]}
    assert record.get("my/figure") == [1, 2] and record.get("student/acc") is None
    write_record(tmp_path, record)
    again = read_record(tmp_path)
    assert again == record and again.to_dict()["diag/q_true_mean"] == 0.4
    with pytest.raises(RecordError, match=r"extra keys \['student/acc'\] are record fields"):
        RunRecord(status="ok", extra={"student/acc": 0.5})


def test_get_and_merged_speak_metrics_json_keys():
    record = RunRecord.from_dict(OK_RECORD)
    assert (
        record.get("student/acc") == 0.69 and record.get("seed") == 1 and record.get("diag/sim_corr") == 0.5
    )
    assert record.get("schema_version") == SCHEMA_VERSION
    merged = record.merged({"student/acc": 0.5, "diag/new": 1.0})
    assert merged.student_acc == 0.5 and merged.extra["diag/new"] == 1.0 and record.student_acc == 0.69
    with pytest.raises(RecordError, match="'student/acc' should be a number, not str '0.5'"):
        record.merged({"student/acc": "0.5"})


def test_nan_and_infinity_are_written_as_null(tmp_path):
    record = RunRecord.from_dict({**OK_RECORD, "fidelity/kl": math.nan, "time/fit_s": math.inf})
    path = write_record(tmp_path / "run" / "metrics.json", record)

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    on_disk = json.loads(path.read_text(), parse_constant=refuse)
    assert on_disk["fidelity/kl"] is None and on_disk["time/fit_s"] is None
    assert on_disk["schema_version"] == SCHEMA_VERSION and on_disk["student/acc"] == 0.69
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file, then renamed


def test_read_record_takes_a_file_or_a_run_folder(tmp_path):
    run = tmp_path / "run"
    write_record(run / "metrics.json", RunRecord.from_dict(FAILED_RECORD))
    assert read_record(run) == read_record(run / "metrics.json") == RunRecord.from_dict(FAILED_RECORD)
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", r"JSONDecodeError: Expecting value"),
        ("[1, 2]", r"a JSON object is expected, found list"),
        ('{"method": "kd"}', r"no 'status' \(kdx-train writes ok, failed, ...\)"),
        ('{"status": "ok", "seed": "zero"}', r"'seed' should be an integer, not str 'zero'"),
        (
            '{"status": "ok", "choices": [1]}',
            r"'choices' should be a mapping of group choices, not list \[1\]",
        ),
        ('{"status": "ok", "epochs": 1.5}', r"'epochs' should be an integer, not float 1.5"),
        ('{"status": "ok", "student/acc": true}', r"'student/acc' should be a number, not bool True"),
    ],
)
def test_a_file_that_is_not_a_record_raises_record_error_naming_it(tmp_path, text, reason):
    path = tmp_path / "metrics.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecordError, match=reason) as err:
        read_record(path)
    assert str(err.value).startswith(f"{path}: ") and err.value.path == Path(path)


def test_the_summary_figures():
    record = RunRecord.from_dict(OK_RECORD)
    rows = dict(record.summary_rows())
    assert rows["student/acc"] == "69.00 %" and rows["fidelity/agreement"] == "81.00 %"
    assert rows["fidelity/kl"] == "0.33" and rows["time/fit_s"] == "12.5"
    assert rows["teacher"] == "retrained: /cache/teachers/cnn1d-0123.pt"
    assert [key for key, _ in record.summary_rows()][:2] == ["student/acc", "student/acc_best"]
    assert record.title() == "kd-t4 · cnn1d → mlp on mnist1d · seed 1"
    assert dict(RunRecord(status="ok", method="none").summary_rows()) == {}


def test_the_multirun_report_reads_each_job_through_the_record(tmp_path, capsys):
    from omegaconf import OmegaConf

    from kdx.hydra_callbacks import MultirunReport

    write_record(tmp_path / "0", RunRecord.from_dict(OK_RECORD))
    write_record(tmp_path / "1", RunRecord.from_dict(FAILED_RECORD))
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "metrics.json").write_text('{"method": "kd"}')  # no status: not a record
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as exit_:
        MultirunReport().on_multirun_end(config)
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"kdx multirun: 3 jobs in {tmp_path}"
    assert lines[1].split() == "0 ok kd-t4 seed 1 acc 69.00 % best 70.00 %".split()
    assert (
        "failed" in lines[2]
        and "seed abc" in lines[2]
        and "KDXError: seed='abc' is not an integer" in lines[2]
    )
    assert lines[3].split()[:2] == ["10", "unreadable"]
    assert "2 of 3 jobs failed (job 1, 10)" in err


def test_a_job_at_chance_is_named_by_the_multirun_report_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from kdx.hydra_callbacks import MultirunReport
    from kdx.pipeline import run as pipeline

    at_chance = {
        **OK_RECORD,
        "status": "no_learning",
        "error": "the student stayed at chance level: ...",
        "error_type": "NoLearningError",
        "log": None,
    }
    # the job itself: the line, no exit, the sweep's worst score (as for a failed job)
    monkeypatch.setattr(pipeline, "run", lambda cfg: RunRecord.from_dict(at_chance).to_dict())
    monkeypatch.setattr(pipeline, "is_multirun", lambda: True)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "job")}, "print_summary": False})
    assert pipeline.run_job(cfg) == float("-inf")
    assert "kdx: error: the student stayed at chance level" in capsys.readouterr().err
    # the sweep's report: the job's status and figures, and exit 1 once every job ran
    write_record(tmp_path / "0", RunRecord.from_dict(OK_RECORD))
    write_record(tmp_path / "1", RunRecord.from_dict(at_chance))
    with pytest.raises(SystemExit) as exit_:
        MultirunReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[2].split()[:2] == ["1", "no_learning"] and "acc  69.00 %" in out.splitlines()[2]
    assert "1 of 2 jobs failed (job 1)" in err
