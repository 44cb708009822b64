"""kdx-runs: a multirun listed with the config values that differ, filtered, sorted, and its best run
picked by the monitor on validation (never a test figure)."""

from __future__ import annotations

import pytest

from kdx.runs import best_run, list_runs, main
from test_table import MNIST1D, ok_record, write_run


def monitored(method, seed, val, test, hidden, **kw):
    extra = {"monitor": "val/student/acc", "monitor_mode": "max", "monitor/best": val}
    config = {"student": {"model": {"hidden": hidden}}, "method": {"alpha": 0.9 if method == "kd" else None}}
    return ok_record(method, seed, test, test, names=MNIST1D, extra=extra, config=config, **kw)


@pytest.fixture()
def multirun(tmp_path):
    root = tmp_path / "multirun"
    jobs = [
        ("none", 0, 0.50, 0.55, [32]),
        ("kd", 0, 0.60, 0.52, [32]),
        ("none", 0, 0.58, 0.70, [100, 100]),  # the best test figure, not the best validation
        ("kd", 0, 0.65, 0.61, [100, 100]),  # the best validation figure
    ]
    for job, args in enumerate(jobs):
        write_run(root / str(job), monitored(*args))
    return root


def test_lists_the_differing_keys(multirun, capsys):
    runs, keys = list_runs([multirun])
    # method.alpha differs between none and kd, but is the method's own: the method column says it
    assert keys == ["student.model.hidden"]
    assert [r.path.name for r in runs] == ["0", "1", "2", "3"]
    assert main([str(multirun)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run",
        "status",
        "seed",
        "method",
        "student.model.hidden",
        "val/student/acc",
        "best",
        "%",
        "last",
        "%",
        "agree",
        "last",
        "%",
    ]
    assert lines[4].split()[1:] == ["ok", "0", "kd", "[100,100]", "0.65", "61.00", "61.00", "80.00"]


def test_where_sort_paths(multirun, capsys):
    runs, _ = list_runs([multirun], where=["method=kd"])
    assert [r.path.name for r in runs] == ["1", "3"]
    runs, _ = list_runs([multirun], where=["student.model.hidden=[100,100]", "method=none"])
    assert [r.path.name for r in runs] == ["2"]
    runs, _ = list_runs([multirun], sort="-student/acc_best")
    assert [r.path.name for r in runs] == ["2", "3", "0", "1"]
    runs, _ = list_runs([multirun], sort="monitor/best")
    assert [r.path.name for r in runs] == ["0", "2", "1", "3"]
    assert main([str(multirun), "--where", "method=kd", "--paths"]) == 0
    assert capsys.readouterr().out.split() == [str(multirun / "1"), str(multirun / "3")]
    assert main([str(multirun), "--where", "method"]) == 2
    assert main([str(multirun), "--where", "method=crd"]) == 1


def test_best_is_picked_on_validation_never_on_test(multirun, capsys):
    (best,), _ = list_runs([multirun], best=True)
    assert best.path.name == "3"  # val 0.65, though job 2 has the higher test accuracy
    assert main([str(multirun), "--best", "--paths"]) == 0
    assert capsys.readouterr().out.strip() == str(multirun / "3")
    # within the narrow students only
    (best,), _ = list_runs([multirun], where=["student.model.hidden=[32]"], best=True)
    assert best.path.name == "1"
    # a loss monitor: the smallest wins
    runs, _ = list_runs([multirun])
    for r in runs:
        r.record.monitor, r.record.monitor_mode = "val/loss", "min"
    assert best_run(runs).path.name == "0"
    for r in runs:
        r.record.monitor = "test/student/acc"
    with pytest.raises(ValueError, match="test figure"):
        best_run(runs)


def test_best_refuses_runs_with_different_monitors(multirun, capsys):
    record = monitored("kd", 1, 0.9, 0.9, [32]) | {"monitor": "val/loss", "monitor_mode": "min"}
    write_run(multirun / "4", record)
    assert main([str(multirun), "--best"]) == 2
    assert "monitored different figures" in capsys.readouterr().err
