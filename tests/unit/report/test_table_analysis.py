"""kdx-table's analysis side: rows that cannot merge different configs,
debug runs left out, scipy statistics with golden values by hand, per-seed points, curves from the CSV
logs, best-checkpoint fidelity, and result files that are never made worse."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import special, stats

from kdx.report import configs
from kdx.report.curves import read_curves
from kdx.report.stats import compare, seeds_needed
from kdx.table import draw, main, make_table, search, write_curves
from test_table import MNIST1D, ok_record, record, write_run

HIDDEN = {"student": {"model": {"hidden": [100, 100]}}}
NARROW = {"student": {"model": {"hidden": [32]}}}


def two_sweeps(root: Path) -> None:
    """Two multiruns of kd × 3 seeds that differ only in a list-valued key."""
    for sweep, config, base in (("A", HIDDEN, 0.80), ("B", NARROW, 0.60)):
        for seed in range(3):
            acc = base + 0.01 * seed
            write_run(root / sweep / str(seed), ok_record("kd", seed, acc, acc, names=MNIST1D, config=config))


# -- grouping ------------------------------------------------------------------------------------


def test_list_valued_key_splits_rows_without_and_with_by(tmp_path, caplog):
    two_sweeps(tmp_path)
    # the legacy grouping (the function's default) merges them, and says so
    with caplog.at_level(logging.WARNING, logger="kdx.table"):
        (merged,), _ = make_table([tmp_path])
    assert merged["n"] == 6
    assert any("differ in student.model.hidden" in m for m in caplog.messages)
    # kdx-table's grouping: a row per differing value, printed readably
    rows, markdown = make_table([tmp_path], split=True)
    assert {r["student.model.hidden"]: r["n"] for r in rows} == {"[100,100]": 3, "[32]": 3}
    assert "| method | student.model.hidden |" in markdown and "| [100,100] | 3 |" in markdown
    # --by on the list key: the same two rows (it used to drop list values and merge them)
    rows, _ = make_table([tmp_path], by=["student.model.hidden"])
    assert {r["student.model.hidden"]: r["n"] for r in rows} == {"[100,100]": 3, "[32]": 3}
    # 80, 81, 82 → 81 ± 1; 60, 61, 62 → 61 ± 1
    means = {r["student.model.hidden"]: r["student/acc_best_mean"] for r in rows}
    assert means == {"[100,100]": pytest.approx(81.0), "[32]": pytest.approx(61.0)}


def test_cli_splits_by_differing_keys_without_by(tmp_path, capsys):
    two_sweeps(tmp_path)
    assert main([str(tmp_path), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "| [100,100] | 3 | 81.00 ± 1.00 |" in printed and "| [32] | 3 | 61.00 ± 1.00 |" in printed


def test_dict_values_and_keys_that_are_not_config_differences(tmp_path):
    for seed in range(2):
        for name, sched in (("a", {"name": "cos", "warmup": [1, 2]}), ("b", {"name": "step", "gamma": 0.1})):
            config = {"optim": {"sched": sched}, "paths": {"output_dir": str(tmp_path / f"{name}{seed}")}}
            write_run(
                tmp_path / f"{name}{seed}", ok_record("kd", seed, 0.5, 0.5, names=MNIST1D, config=config)
            )
    rows, _ = make_table([tmp_path], split=True)
    # seeds and paths differ between every run; only the scheduler's keys split rows
    assert len(rows) == 2 and all(r["n"] == 2 for r in rows)
    keys = {k for r in rows for k in r if k.startswith("optim.")}
    assert keys == {"optim.sched.name", "optim.sched.warmup", "optim.sched.gamma"}
    cos = next(r for r in rows if r["optim.sched.name"] == "cos")
    assert cos["optim.sched.warmup"] == "[1,2]" and cos["optim.sched.gamma"] == configs.ABSENT
    # a whole mapping named with --by is printed readably
    rows, _ = make_table([tmp_path], by=["optim.sched"])
    assert sorted(r["optim.sched"] for r in rows) == ["{gamma:0.1,name:step}", "{name:cos,warmup:[1,2]}"]
    assert configs.show({"b": [1, {"c": None}], "a": True}) == "{a:true,b:[1,{c:null}]}"


def test_different_teacher_checkpoints_never_share_a_row(tmp_path):
    for seed in range(2):
        for sha in ("a", "b"):
            extra = {"teacher/sha256": sha * 64, "teacher/acc": 0.9 if sha == "a" else 0.3}
            write_run(tmp_path / f"{sha}{seed}", ok_record("kd", seed, 0.5, 0.5, names=MNIST1D, extra=extra))
    for split in (False, True):
        rows, markdown = make_table([tmp_path], split=split)
        assert sorted((r["teacher/sha256"], r["n"]) for r in rows) == [("a" * 12, 2), ("b" * 12, 2)]
        assert sorted(r["teacher/acc_mean"] for r in rows) == [pytest.approx(30.0), pytest.approx(90.0)]
    rows, _ = make_table([tmp_path], by=["method"])  # with --by too
    assert len(rows) == 2


def test_a_teacher_per_seed_shares_rows(tmp_path):
    """Seed s of every row distilled from teacher s: rows average over seeds (and teachers), and
    each seed's pair of rows compares runs of one teacher."""
    for seed, sha in ((0, "a"), (1, "b"), (2, "c")):
        for method, acc in (("kd", 0.6 + seed / 100), ("dkd", 0.5 + seed / 100)):
            extra = {"teacher/sha256": sha * 64, "teacher/acc": 0.8 + seed / 100}
            record = ok_record(method, seed, acc, acc, names=MNIST1D, extra=extra)
            write_run(tmp_path / f"{method}{seed}", record)
    rows, _ = make_table([tmp_path], by=["method"], versus="dkd")
    assert sorted((r["method"], r["n"]) for r in rows) == [("dkd", 3), ("kd", 3)]
    kd = next(r for r in rows if r["method"] == "kd")
    assert kd["teacher/acc_mean"] == pytest.approx(81.0)  # (80 + 81 + 82) / 3
    assert kd["student/acc_best_mean"] == pytest.approx(61.0)


def test_debug_runs_are_left_out_unless_asked(tmp_path, capsys, caplog):
    full = {"trainer": {"limit_train_batches": 1.0}}  # a float 1.0 is every batch: not debug
    write_run(tmp_path / "real", ok_record("kd", 0, 0.8, 0.8, names=MNIST1D, config=full))
    debug = {
        "dbg": {"choices": {"debug": "limit"}},
        "fdr": {"config": {"trainer": {"fast_dev_run": True}}},
        "frac": {"config": {"trainer": {"limit_train_batches": 0.25}}},
        "count": {"config": {"trainer": {"limit_val_batches": 2}}},
    }
    for name, kw in debug.items():
        write_run(tmp_path / name, ok_record("kd", 1, 0.1, 0.1, names=MNIST1D, **kw))
    write_run(tmp_path / "full", ok_record("kd", 2, 0.8, 0.8, names=MNIST1D, config=full))
    found = search([tmp_path], include_debug=False)
    assert sorted(r.path.name for r in found.debug) == sorted(debug)
    assert sorted(r.path.name for r in found.runs) == ["full", "real"]
    rows, markdown = make_table([tmp_path], include_debug=False)
    assert rows[0]["n"] == 2 and "4 debug run(s) left out" in markdown
    with caplog.at_level(logging.WARNING, logger="kdx.table"):
        assert main([str(tmp_path), "--no-plot"]) == 0
    assert "| kd | 2 |" in capsys.readouterr().out
    assert any(
        "left out 4 debug run(s) (debug=limit, trainer.fast_dev_run=True" in m for m in caplog.messages
    )
    assert main([str(tmp_path), "--no-plot", "--include-debug", "--by", "method"]) == 0
    assert "| kd | 6 |" in capsys.readouterr().out


# -- statistics ----------------------------------------------------------------------------------


def test_welch_p_value_and_interval_by_hand(tmp_path):
    # a = 1, 2, 3 (none), b = 4, 5, 6, 7 (kd), in points: t = 3.5 / sqrt(3/4) = 4.04145, df = 4.95918
    # (test_table's golden values). p = I_{df/(df+t²)}(df/2, 1/2) (the t distribution's tail as an
    # incomplete beta); CI = 3.5 ± t_{0.975, df} · sqrt(3/4).
    t, df = 3.5 / math.sqrt(0.75), 0.5625 * 432 / 49
    p = special.betainc(df / 2, 0.5, df / (df + t * t))
    half = stats.t.ppf(0.975, df) * math.sqrt(0.75)
    for seed, best in enumerate([0.01, 0.02, 0.03]):
        write_run(tmp_path / f"n{seed}", ok_record("none", seed, best, best, names=MNIST1D))
    for seed, best in enumerate([0.04, 0.05, 0.06, 0.07]):
        write_run(tmp_path / f"k{seed}", ok_record("kd", seed, best, best, names=MNIST1D))
    rows, markdown = make_table([tmp_path], versus="none")
    kd = next(r for r in rows if r["method"] == "kd")
    assert kd["versus_t"] == pytest.approx(4.04145, abs=1e-5) and kd["versus_df"] == pytest.approx(
        4.95918, abs=1e-5
    )
    assert kd["versus_p"] == pytest.approx(p, rel=1e-9) and kd["versus_p"] == pytest.approx(0.010, abs=5e-4)
    assert kd["versus_ci_low"] == pytest.approx(3.5 - half) and kd["versus_ci_high"] == pytest.approx(
        3.5 + half
    )
    # shared seeds 0, 1, 2: kd − none = 3, 3, 3 exactly, a paired test has no variance to test
    assert kd["versus_paired_n"] == 3 and math.isnan(kd["versus_paired_p"])
    assert "| +3.50 | +4.0 (5.0) | 0.010 | [" in markdown


def test_paired_test_by_seed_by_hand(tmp_path):
    # seeds 0, 1, 2: a = 1, 2, 4; b = 2, 4, 5 → differences −1, −2, −1: mean −4/3, sd sqrt(1/3),
    # t = (−4/3) / (sqrt(1/3) / sqrt(3)) = −4 at df 2, where the two-sided p is 1 − |t| / sqrt(t² + 2)
    result = compare({0: 1.0, 1: 2.0, 2: 4.0}, {0: 2.0, 1: 4.0, 2: 5.0})
    assert result.paired_n == 3
    assert result.paired_t == pytest.approx(-4.0) and result.paired_p == pytest.approx(1 - 4 / math.sqrt(18))
    # the same values without shared seeds: no pairs
    unpaired = compare({0: 1.0, 1: 2.0, 2: 4.0}, {5: 2.0, 6: 4.0, 7: 5.0})
    assert unpaired.paired_n == 0 and math.isnan(unpaired.paired_p)
    assert unpaired.t == pytest.approx(result.t) and unpaired.p == pytest.approx(result.p)
    # through kdx-table: the rows share seeds, so the paired column is filled
    for seed, (x, y) in enumerate([(0.01, 0.02), (0.02, 0.04), (0.04, 0.05)]):
        write_run(tmp_path / f"n{seed}", ok_record("none", seed, x, x, names=MNIST1D))
        write_run(tmp_path / f"k{seed}", ok_record("kd", seed, y, y, names=MNIST1D))
    rows, markdown = make_table([tmp_path], versus="none")
    kd = next(r for r in rows if r["method"] == "kd")
    assert kd["versus_paired_p"] == pytest.approx(1 - 4 / math.sqrt(18)) and "| 0.057 (3) |" in markdown


def test_seeds_needed_matches_the_power_tables():
    # two-sided two-sample t-test, α 0.05, power 0.8: n per group 64 (d = 0.5), 26 (0.8), 17 (1.0)
    assert seeds_needed(0.5, 1.0, 1.0) == 64
    assert seeds_needed(0.8, 1.0, 1.0) == 26
    assert seeds_needed(2.0, 2.0, 2.0) == 17  # d = 2 / 2
    assert seeds_needed(0.0, 1.0, 1.0) == math.inf and math.isnan(seeds_needed(1.0, math.nan, 1.0))


def test_figure_shows_seeds_and_fits_the_students(tmp_path):
    for seed, best in enumerate([0.40, 0.42, 0.44]):
        write_run(tmp_path / f"k{seed}", ok_record("kd", seed, best, best, names=MNIST1D, teacher=0.98))
    rows, _ = make_table([tmp_path])
    fig = draw(rows)
    (ax,) = fig.axes
    offsets = [c.get_offsets() for c in ax.collections if len(c.get_offsets()) == 3]
    assert offsets and sorted(float(y) for _, y in offsets[0]) == pytest.approx([40.0, 42.0, 44.0])
    low, high = ax.get_ylim()
    assert low < 40.0 and 44.0 < high < 60.0  # not stretched to the teacher's 98 %
    assert any("teacher 98.00" in t.get_text() for t in ax.texts)
    assert "teacher (ours)" in [t.get_text() for t in fig.legends[0].get_texts()]


# -- curves --------------------------------------------------------------------------------------

CSV = """epoch,lr-Adam,step,train/loss_epoch,train/loss_step,val/fidelity/agreement,val/student/acc,test/student/acc
,0.01,0,,,,,
0,,9,,{l0},,,
0,,9,,,{g0},{a0},
0,,9,{l0},,,,
1,,19,,{l1},,,
1,,19,,,{g1},{a1},
1,,19,{l1},,,,
1,,20,,,,,0.5
"""


def test_curves_from_a_2x2_multirun(tmp_path):
    root = tmp_path / "multirun"
    expected = {}
    for job, (method, seed) in enumerate([(m, s) for m in ("none", "kd") for s in (0, 1)]):
        folder = write_run(root / str(job), ok_record(method, seed, 0.5, 0.5, names=MNIST1D))
        acc = (0.3 + 0.1 * job, 0.4 + 0.1 * job)
        (folder / "csv").mkdir()
        (folder / "csv" / "metrics.csv").write_text(
            CSV.format(l0=2.0 - job / 10, l1=1.5, g0=0.2, g1=0.3, a0=acc[0], a1=acc[1])
        )
        expected[folder] = acc
    # one row per epoch, empty cells merged away
    assert read_curves(root / "0" / "csv" / "metrics.csv") == {
        "val/student/acc": [(0, 0.3), (1, 0.4)],
        "train/loss_epoch": [(0, 2.0), (1, 1.5)],
        "val/fidelity/agreement": [(0, 0.2), (1, 0.3)],
    }
    rows, _ = make_table([root])
    out = tmp_path / "curves" / "curves.png"
    drawn = write_curves(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = drawn["val/student/acc"]
    assert sorted(acc) == ["mnist1d cnn1d→mlp kd", "mnist1d cnn1d→mlp none"]
    plotted = {run: series for runs in acc.values() for run, series in runs.items()}
    assert set(plotted) == set(expected)  # every run's CSV was drawn
    for folder, (a0, a1) in expected.items():
        assert plotted[folder] == [(0, pytest.approx(a0)), (1, pytest.approx(a1))]
    assert set(drawn) == {"val/student/acc", "train/loss_epoch", "val/fidelity/agreement"}
    assert main([str(root), "--no-plot", "--curves", str(tmp_path / "c2.png")]) == 0
    assert (tmp_path / "c2.png").is_file()


# -- best-checkpoint fidelity --------------------------------------------------------------------


def test_best_checkpoint_fidelity_beside_best_accuracy(tmp_path):
    for seed in range(2):
        extra = {"fidelity/agreement_best": 0.9, "fidelity/kl_best": 0.2, "student/ece_best": 0.03}
        write_run(tmp_path / str(seed), ok_record("kd", seed, 0.8, 0.7, names=MNIST1D, extra=extra))
    (row,), markdown = make_table([tmp_path])
    assert row["fidelity/agreement_best_mean"] == pytest.approx(90.0)
    assert row["fidelity/agreement_mean"] == pytest.approx(80.0)
    header = next(line for line in markdown.splitlines() if "agreement" in line)
    assert "| agreement (best) | agreement (last) | KL(t‖s) (best) | KL(t‖s) (last) |" in header
    assert "ECE student (best) | ECE student (last)" in header
    assert "(best) = measured on the checkpoint student best comes from" in markdown


# -- safety: result files never made worse, bad records refused ------------------------------


def test_an_empty_folder_leaves_the_old_table_byte_identical(tmp_path, capsys):
    write_run(tmp_path / "runs" / "0", ok_record("kd", 0, 0.8, 0.8, names=MNIST1D))
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["table.csv", "table.md", "table.png"]
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert f"{out} left as it was" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_failure_while_writing_leaves_the_old_files(tmp_path, monkeypatch):
    write_run(tmp_path / "runs" / "0", ok_record("kd", 0, 0.8, 0.8, names=MNIST1D))
    out = tmp_path / "out"
    make_table([tmp_path / "runs"], out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_run(tmp_path / "runs" / "1", ok_record("kd", 1, 0.6, 0.6, names=MNIST1D))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("kdx.table.plot", broken)
    with pytest.raises(RuntimeError):
        make_table([tmp_path / "runs"], out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries left either


def test_records_with_bad_figures_are_refused_with_the_file_and_field(tmp_path, caplog):
    write_run(tmp_path / "good", ok_record("kd", 0, 0.80, 0.80, names=MNIST1D))
    write_run(
        tmp_path / "nan", ok_record("kd", 1, 0.8, 0.8, names=MNIST1D).__or__({"fidelity/kl": float("nan")})
    )
    write_run(tmp_path / "percent", ok_record("kd", 2, 7.5, 0.8, names=MNIST1D))
    write_run(tmp_path / "string", ok_record("kd", 3, 0.8, 0.8, names=MNIST1D) | {"student/acc": "0.99"})
    write_run(tmp_path / "bare", {"status": "ok"})
    write_run(
        tmp_path / "diverged",
        record("kd", 5, status="diverged", names=MNIST1D, figures={"student/acc_best": float("nan")}),
    )
    with caplog.at_level(logging.WARNING, logger="kdx.table"):
        rows, markdown = make_table([tmp_path])
    fields = {"nan": "fidelity/kl", "percent": "student/acc_best", "string": "student/acc", "bare": "method"}
    for name, key in fields.items():
        (message,) = [
            m for m in caplog.messages if f"/{name}/metrics.json" in m or f"{tmp_path / name}:" in m
        ]
        assert f"'{key}'" in message, message
    (row,) = rows
    # n counts exactly the runs averaged: the good one; the diverged run is a failure, not a figure
    assert row["n"] == 1 and row["student/acc_best_n"] == 1 and row["fidelity/kl_n"] == 1
    assert row["failed"] == 1 and row["student/acc_best_mean"] == pytest.approx(80.0)


def test_n_says_how_many_runs_a_figure_averages(tmp_path):
    write_run(tmp_path / "0", ok_record("kd", 0, 0.8, 0.8, names=MNIST1D, extra={"fidelity/cka": 0.5}))
    write_run(tmp_path / "1", ok_record("kd", 1, 0.6, 0.6, names=MNIST1D))
    (row,), markdown = make_table([tmp_path])
    assert row["n"] == 2 and row["fidelity/cka_n"] == 1
    assert "0.5000 (n=1)" in markdown and "only k of the row's n runs" in markdown


def test_every_folder_that_cannot_be_read_is_warned_about(tmp_path, monkeypatch, caplog):
    write_run(tmp_path / "good" / "0", ok_record("kd", 0, 0.8, 0.8, names=MNIST1D))
    write_run(tmp_path / "locked" / "0", ok_record("kd", 1, 0.8, 0.8, names=MNIST1D))
    locked = str(tmp_path / "locked")
    real = os.scandir

    def scandir(path="."):  # tests run as root, where chmod 000 does not stop a read
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="kdx.table"):
        found = search([tmp_path])
    assert [r.path.name for r in found.runs] == ["0"] and found.runs[0].path.parent.name == "good"
    assert [str(p) for p, _ in found.skipped] == [locked]
    assert any(locked in m and "Permission denied" in m for m in caplog.messages)


def test_a_reader_that_hangs_up_ends_silently(tmp_path):
    for seed in range(3):
        write_run(tmp_path / str(seed), ok_record("kd", seed, 0.8, 0.8, names=MNIST1D))
    for tool in ("kdx.table", "kdx.runs"):
        proc = subprocess.Popen(
            [sys.executable, "-m", tool, str(tmp_path), *(["--no-plot"] if tool == "kdx.table" else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc.stdout.close()  # `| head` that has already gone
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, err
        assert "Traceback" not in err and "BrokenPipe" not in err
