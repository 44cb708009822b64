"""kdx-table on run folders written by hand: every expected number below is computed by hand.

The fabrication helpers (``record``, ``ok_record``, ``write_run``) write the ``metrics.json`` that
kdx-train writes — and nothing else (no ``.hydra/``). Other table tests import them:
``from test_table import ok_record, record, write_run``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from kdx.table import draw, find_runs, main, make_table, output_files, search, welch

CIFAR = ("cifar100", "wrn_40_2", "wrn_16_2")
MNIST1D = ("mnist1d", "cnn1d", "mlp")
PUBLISHED = {
    "source": "test table",
    "metric": "student/acc_best",
    "units": "percent",
    "seeds": None,
    "tolerance": 0.5,
    "teacher": 75.61,
    "student": {"none": 73.26, "kd": 74.92, "crd": 75.48},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def record(
    method: str = "kd",
    seed: int = 0,
    *,
    status: str = "ok",
    figures: dict[str, Any] | None = None,
    names: tuple[str, str, str] = CIFAR,
    experiment: str | None = None,
    published: dict | None = None,
    label: str | None = None,
    config: dict | None = None,
    choices: dict | None = None,
    error: str | None = None,
    error_type: str | None = None,
    tags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A metrics.json record as kdx-train writes it: names, Hydra choices, the resolved config
    (``config`` is merged into a minimal one), published block, tags, label, then ``figures``."""
    dataset, teacher, student = names
    group_choices = {"dataset": dataset, "teacher": teacher, "student": student, "method": method}
    group_choices |= {"optim": "adam", "experiment": experiment} | (choices or {})
    resolved = {
        "seed": seed,
        "dataset": {"name": dataset},
        "teacher": {"name": teacher, "ckpt": "auto"},
        "student": {"name": student},
        "method": {"_target_": f"kdx.methods.{method}", "name": method},
        "published": published,
    }
    out: dict[str, Any] = {
        "status": status,
        "seed": seed,
        "method": method,
        "dataset": dataset,
        "teacher": teacher,
        "student": student,
        "choices": group_choices,
        "config": _merge(resolved, config or {}),
        "published": published,
        "tags": list(tags),
    }
    if label is not None:
        out["label"] = label
    if status != "ok":
        out["error"] = error or f"the run ended with status {status}"
        out["error_type"] = error_type or "RuntimeError"
    return out | (figures or {})


def ok_record(
    method: str,
    seed: int,
    best: float,
    last: float,
    *,
    teacher: float = 0.7560,
    extra: dict | None = None,
    **kw,
) -> dict[str, Any]:
    """A successful run's record; accuracies as fractions (as kdx-train writes them)."""
    figures = {
        "student/acc_best": best,
        "student/acc": last,
        "teacher/acc": teacher,
        "fidelity/kl": 0.5 + seed,
        "fidelity/agreement": 0.80,
        "student/ece": 0.05,
        "teacher/ece": 0.04,
        "time/fit_s": 10.0 * (seed + 1),
        "throughput/train_samples_per_s": 1000.0,
        "student/val_acc_best": best,
        "teacher/sha256": "0" * 64,
        **(extra or {}),
    }
    return record(method, seed, figures=figures, **kw)


def write_run(folder: Path, data: dict | str) -> Path:
    """A run folder holding only ``metrics.json`` (``data`` as JSON, or a raw string as is)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (folder / "metrics.json").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """A multirun folder: kd ×3 seeds; none ×2 seeds + 1 failed + 1 still running; and job 7,
    killed before it wrote anything."""
    root = tmp_path / "multirun"
    exp = "crd_cifar100/wrn_40_2_wrn_16_2"
    for seed, (best, last) in enumerate([(0.75, 0.74), (0.76, 0.75), (0.77, 0.79)]):
        extra = {"fidelity/kernel_gap": 0.2} if seed == 0 else {}
        write_run(
            root / str(seed),
            ok_record("kd", seed, best, last, extra=extra, published=PUBLISHED, experiment=exp),
        )
    for job, (seed, best) in enumerate([(0, 0.7330), (1, 0.7320)], start=3):
        write_run(root / str(job), ok_record("none", seed, best, best, published=PUBLISHED, experiment=exp))
    failed = record(
        "none", 2, status="failed", error="loss is nan at epoch 3", error_type="NonFiniteLossError"
    )
    write_run(root / "5", failed | {"published": PUBLISHED})
    write_run(root / "6", record("none", 3, status="running", published=PUBLISHED, experiment=exp))
    (root / "7").mkdir()
    (root / "7" / "train.log").write_text("killed\n")
    return root


def rows_by_method(rows):
    return {r["method"]: r for r in rows}


def test_mean_std_delta_and_tolerance(sweep, tmp_path):
    rows, markdown = make_table([sweep], out=tmp_path / "out")
    assert [r["method"] for r in rows] == ["none", "kd"]  # baseline first
    kd, none = rows_by_method(rows)["kd"], rows_by_method(rows)["none"]

    # kd best: 75, 76, 77 → mean 76.00, sample std 1.00; Δ = 76.00 − 74.92 = +1.08 > 0.5
    assert kd["n"] == 3 and kd["failed"] == 0 and kd["missing"] == 0 and kd["seeds"] == "0 1 2"
    assert kd["student/acc_best_mean"] == pytest.approx(76.0)
    assert kd["student/acc_best_std"] == pytest.approx(1.0)
    # kd last: 74, 75, 79 → mean 76.00, deviations −2, −1, +3 → std = sqrt(14 / 2) = sqrt(7)
    assert kd["student/acc_mean"] == pytest.approx(76.0)
    assert kd["student/acc_std"] == pytest.approx(math.sqrt(7.0))
    assert kd["published"] == pytest.approx(74.92)
    assert kd["delta"] == pytest.approx(1.08)
    assert kd["within_tolerance"] is False
    # teacher: 75.60 in every run → Δ to 75.61 = −0.01; fidelity: KL 0.5, 1.5, 2.5 → 1.5 ± 1.0
    assert kd["teacher/acc_mean"] == pytest.approx(75.60)
    assert kd["teacher/acc_std"] == pytest.approx(0.0)
    assert kd["teacher_delta"] == pytest.approx(-0.01)
    assert kd["fidelity/kl_mean"] == pytest.approx(1.5) and kd["fidelity/kl_std"] == pytest.approx(1.0)
    assert kd["fidelity/agreement_mean"] == pytest.approx(80.0)
    # ECE 0.05 and 0.04 in every run → 5.00 % and 4.00 %
    assert kd["student/ece_mean"] == pytest.approx(5.0) and kd["teacher/ece_mean"] == pytest.approx(4.0)
    # kernel_gap only in seed 0: a mean of one value, no std
    assert kd["fidelity/kernel_gap_n"] == 1 and kd["fidelity/kernel_gap_mean"] == pytest.approx(0.2)
    assert math.isnan(kd["fidelity/kernel_gap_std"])
    assert kd["time/fit_s_mean"] == pytest.approx(20.0)  # 10, 20, 30

    # none: 73.30, 73.20 → 73.25 ± sqrt(2 · 0.05² / 1) = 0.0707; Δ = 73.25 − 73.26 = −0.01, inside
    # ±0.5; seed 2 failed, seed 3 still running
    assert none["n"] == 2 and none["failed"] == 1 and none["missing"] == 1 and none["seeds"] == "0 1"
    assert none["student/acc_best_mean"] == pytest.approx(73.25)
    assert none["student/acc_best_std"] == pytest.approx(math.sqrt(0.005))
    assert none["published"] == pytest.approx(73.26)
    assert none["delta"] == pytest.approx(-0.01)
    assert none["within_tolerance"] is True

    assert "76.00 ± 1.00" in markdown and "76.00 ± 2.65" in markdown
    assert "+1.08" in markdown and "no (±0.5)" in markdown
    assert "73.25 ± 0.07" in markdown and "-0.01" in markdown and "yes (±0.5)" in markdown
    assert "NonFiniteLossError: loss is nan at epoch 3" in markdown
    assert "seed 3): running" in markdown
    # job 7 has no record: listed by its folder, counted in no row
    assert f"`{(sweep / '7').resolve()}`" in markdown


def test_reads_metrics_json_only(sweep, tmp_path):
    """Hydra's .hydra/ folders are never read: misleading ones change nothing, and without any
    (the fixture writes none) the table is complete."""
    _, plain = make_table([sweep])
    decoy = tmp_path / "decoy"
    shutil.copytree(sweep, decoy)
    for job in decoy.iterdir():
        (job / ".hydra").mkdir()
        (job / ".hydra" / "config.yaml").write_text("published: {student: {kd: 1.0}}\nseed: 99\n")
        (job / ".hydra" / "hydra.yaml").write_text("hydra: {runtime: {choices: {method: crd}}}\n")
    _, with_decoys = make_table([decoy])
    assert with_decoys.replace(str(decoy.resolve()), "X").replace(str(decoy), "X") == plain.replace(
        str(sweep.resolve()), "X"
    ).replace(str(sweep), "X")


def test_files_go_inside_the_out_folder(sweep, tmp_path):
    out = tmp_path / "results" / "mnist1d"
    make_table([sweep], out=out)
    assert sorted(p.name for p in out.iterdir()) == ["table.csv", "table.md", "table.png"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist1d"]  # nothing beside the folder
    assert (out / "table.md").read_text().startswith("| dataset |")
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "table.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert float(table["kd"]["student/acc_best_mean"]) == pytest.approx(76.0)
    assert float(table["kd"]["delta"]) == pytest.approx(1.08)
    assert table["kd"]["within_tolerance"] == "False" and table["none"]["within_tolerance"] == "True"
    assert int(table["none"]["failed"]) == 1 and int(table["none"]["missing"]) == 1
    # an explicit file name keeps its folder and stem
    assert output_files(tmp_path / "r" / "crd.md") == {
        ext: tmp_path / "r" / f"crd.{ext}" for ext in ("md", "csv", "png")
    }


def test_groups_without_published_numbers_and_by_keys(tmp_path):
    root = tmp_path / "runs"
    for seed, acc in enumerate([0.60, 0.64]):
        m = ok_record(
            "kd", seed, acc, acc, names=MNIST1D, experiment="mnist1d/table", config={"method": {"T": 4}}
        )
        write_run(root / f"a{seed}", m)
    write_run(root / "b0", ok_record("kd", 0, 0.50, 0.50, names=MNIST1D, config={"method": {"T": 2}}))

    rows, markdown = make_table([root])
    assert len(rows) == 1 and rows[0]["n"] == 3  # the four keys alone merge both experiments
    assert "published" not in markdown.splitlines()[0]
    assert math.isnan(rows[0]["delta"]) and rows[0]["within_tolerance"] is None

    # a group choice, looked up in `choices`
    rows, _ = make_table([root], by=["experiment"])
    by_exp = {r["experiment"]: r for r in rows}
    assert by_exp["mnist1d/table"]["n"] == 2
    # 60, 64 → mean 62, sample std sqrt((2² + 2²) / 1) = sqrt(8)
    assert by_exp["mnist1d/table"]["student/acc_best_mean"] == pytest.approx(62.0)
    assert by_exp["mnist1d/table"]["student/acc_best_std"] == pytest.approx(math.sqrt(8.0))
    assert by_exp[""]["n"] == 1  # a run without an experiment
    # a dotted path, looked up in `config`; the same split as above, named by the value
    rows, markdown = make_table([root], by=["method.T"])
    assert {r["method.T"]: r["n"] for r in rows} == {"2": 1, "4": 2}
    assert "| method | method.T |" in markdown


def test_label_is_a_row_of_its_own(tmp_path):
    """A control switch (label) splits a method's runs; the published figure is still its method's."""
    published = _merge(PUBLISHED, {"student": {"backward": 70.0}})
    for seed, acc in enumerate([0.70, 0.72]):
        write_run(tmp_path / f"b{seed}", ok_record("backward", seed, acc, acc, published=published))
        control = ok_record("backward", seed, acc - 0.1, acc, published=published, label="backward-step0")
        write_run(tmp_path / f"c{seed}", control)
    write_run(tmp_path / "kd", ok_record("kd", 0, 0.75, 0.75, published=published))
    rows, markdown = make_table([tmp_path])
    assert [r["method"] for r in rows] == [
        "kd",
        "backward",
        "backward-step0",
    ]  # kd first, label after its method
    kd, plain, control = rows
    assert control["base_method"] == "backward" and control["n"] == 2 and plain["n"] == 2
    # plain: 70, 72 → 71, Δ = 71 − 70 = +1.00; control: 60, 62 → 61, Δ = 61 − 70 = −9.00;
    # kd: 75 − 74.92 = +0.08
    assert plain["student/acc_best_mean"] == pytest.approx(71.0)
    assert control["student/acc_best_mean"] == pytest.approx(61.0)
    assert plain["delta"] == pytest.approx(1.0) and control["delta"] == pytest.approx(-9.0)
    assert kd["delta"] == pytest.approx(0.08)
    assert "| backward-step0 | 2 |" in markdown


def test_fraction_units_and_scratch_alias(tmp_path):
    published = {"metric": "student/acc", "units": "fraction", "tolerance": 0.01, "scratch": 0.70}
    write_run(tmp_path / "r0", ok_record("none", 0, 0.80, 0.704, published=published))
    (row,) = make_table([tmp_path])[0]
    # 0.70 → 70 %, tolerance 0.01 → 1 point; last-epoch 70.4 − 70 = +0.4 ≤ 1
    assert row["published"] == pytest.approx(70.0) and row["tolerance"] == pytest.approx(1.0)
    assert row["delta"] == pytest.approx(0.4) and row["within_tolerance"] is True


def test_failed_and_diverged_are_counted_not_averaged(tmp_path):
    write_run(tmp_path / "0", ok_record("kd", 0, 0.60, 0.60))
    write_run(tmp_path / "1", record("kd", 1, status="diverged", figures={"student/acc_best": 0.01}))
    write_run(tmp_path / "2", record("kd", 2, status="failed", error="CUDA out of memory"))
    (row,) = make_table([tmp_path])[0]
    assert row["n"] == 1 and row["failed"] == 2 and row["missing"] == 0
    assert row["student/acc_best_mean"] == pytest.approx(60.0)  # the diverged run's 1 % is not averaged
    _, markdown = make_table([tmp_path])
    assert "diverged" in markdown and "RuntimeError: CUDA out of memory" in markdown


def test_a_run_at_chance_is_averaged_in_and_marked(tmp_path):
    # a method that collapsed on one seed of two: the collapse shows in the row, not only beside it
    write_run(tmp_path / "0", ok_record("kd", 0, 0.80, 0.80))
    collapsed = ok_record("kd", 1, 0.50, 0.50, status="no_learning")
    collapsed.update(error="the student stayed at chance level: ...", error_type="NoLearningError", log=None)
    write_run(tmp_path / "1", collapsed)
    (row,) = make_table([tmp_path])[0]
    assert row["n"] == 2 and row["no_learning"] == 1 and row["failed"] == 0
    assert row["student/acc_best_mean"] == pytest.approx(65.0)  # (80 + 50) / 2, not the survivor's 80
    _, markdown = make_table([tmp_path])
    assert "| at chance | failed |" in markdown and "majority class (status no_learning)" in markdown
    assert "no_learning: NoLearningError: the student stayed at chance level" in markdown
    # a table without such a run has no such column
    (tmp_path / "1" / "metrics.json").unlink()
    assert "at chance" not in make_table([tmp_path])[1]


def test_unreadable_or_malformed_run_folders_are_skipped_with_a_warning(tmp_path, caplog):
    write_run(tmp_path / "good", ok_record("kd", 0, 0.60, 0.60))
    write_run(tmp_path / "truncated", '{"status": "ok", "student/acc')
    write_run(tmp_path / "list", "[1, 2]")
    write_run(tmp_path / "no_status", json.dumps({"method": "kd", "student/acc": 0.5}))
    write_run(tmp_path / "bad_seed", ok_record("kd", 0, 0.9, 0.9) | {"seed": "zero"})
    (tmp_path / "folder_named_metrics" / "metrics.json").mkdir(parents=True)  # read_text: IsADirectoryError
    bad = ["truncated", "list", "no_status", "bad_seed", "folder_named_metrics"]
    with caplog.at_level(logging.WARNING, logger="kdx.table"):
        found = search([tmp_path])
        rows, markdown = make_table([tmp_path])
    assert [r.path.name for r in found.runs] == ["good"]
    assert sorted(path.name for path, _ in found.skipped) == sorted(bad)
    assert rows[0]["n"] == 1 and rows[0]["student/acc_best_mean"] == pytest.approx(60.0)
    for name in bad:  # each named in a warning and under the table
        assert any(name in message and "skipping" in message for message in caplog.messages), name
        assert f"{tmp_path / name}`" in markdown
    assert "'seed' should be an integer" in markdown and "no 'status'" in markdown


def test_cka_column_next_to_the_kernel_gap(tmp_path):
    write_run(
        tmp_path / "0", ok_record("kd", 0, 0.6, 0.6, extra={"fidelity/kernel_gap": 0.3, "fidelity/cka": 0.9})
    )
    write_run(
        tmp_path / "1", ok_record("kd", 1, 0.6, 0.6, extra={"fidelity/kernel_gap": 0.5, "fidelity/cka": 0.7})
    )
    (row,), markdown = make_table([tmp_path])
    # CKA 0.9, 0.7 → 0.8 ± sqrt((0.1² + 0.1²) / 1) = 0.1414
    assert row["fidelity/cka_mean"] == pytest.approx(0.8) and row["fidelity/cka_std"] == pytest.approx(
        0.02**0.5
    )
    header = next(line for line in markdown.splitlines() if "kernel gap" in line)
    assert "| kernel gap | CKA |" in header
    assert "0.8000 ± 0.1414" in markdown


def test_plot_draws_only_groups_with_results_and_keeps_the_legend_clear(tmp_path):
    """Two pairs with results, one pair whose runs all failed: two panels, the legend outside both."""
    for seed, acc in enumerate([0.70, 0.72]):
        write_run(tmp_path / f"kd{seed}", ok_record("kd", seed, acc, acc, published=PUBLISHED))
        write_run(tmp_path / f"m{seed}", ok_record("kd", seed, acc, acc, names=MNIST1D))
    write_run(tmp_path / "lost", record("kd", 0, status="failed", names=("cifar100", "resnet56", "resnet20")))
    write_run(tmp_path / "lost_none", record("none", 0, status="failed", names=MNIST1D))
    rows, _ = make_table([tmp_path])
    assert len(rows) == 4  # every group is a table row, the failed-only ones too
    fig = draw(rows)
    fig.canvas.draw()
    titles = sorted(ax.get_title() for ax in fig.axes)
    assert titles == ["cifar100: wrn_40_2 → wrn_16_2", "mnist1d: cnn1d → mlp"]
    mnist_panel = next(ax for ax in fig.axes if ax.get_title().startswith("mnist1d"))
    assert [t.get_text() for t in mnist_panel.get_xticklabels()] == ["kd"]  # not the failed-only none
    (legend,) = fig.legends
    assert sorted(t.get_text() for t in legend.get_texts()) == [
        "ours (mean ± std)",
        "published",
        "teacher (ours)",
    ]
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), ax.get_title()


def test_cli(sweep, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| dataset | teacher → student | method |" in printed and "76.00 ± 1.00" in printed
    assert f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'table.png'}" in printed
    assert (out / "table.png").is_file()
    assert main([str(tmp_path / "does-not-exist")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1
    write_run(tmp_path / "only_bad", "not json")
    assert main([str(tmp_path / "only_bad")]) == 1
    assert "only_bad" in capsys.readouterr().err


def test_single_metrics_file_and_no_double_count(sweep):
    runs = find_runs([sweep, sweep / "0", sweep / "0" / "metrics.json"])
    assert len(runs) == 7  # 7 records (5 ok, 1 failed, 1 running), each counted once
    # asked for one job only: its killed sibling (7) was not asked for
    assert search([sweep / "0"]).without_record == []
    assert search([sweep]).without_record == [(sweep / "7").resolve()]


def test_welch_t_and_degrees_of_freedom_by_hand():
    # a = 1, 2, 3: mean 2, s = 1, s²/n = 1/3; b = 4, 5, 6, 7: mean 5.5, s² = 5/3, s²/n = 5/12.
    # t = (2 − 5.5) / sqrt(1/3 + 5/12) = −3.5 / sqrt(3/4) = −4.04145;
    # df = (3/4)² / ((1/3)²/2 + (5/12)²/3) = 0.5625 / (1/18 + 25/432) = 0.5625 / (49/432) = 4.95918
    t, df = welch((2.0, 1.0, 3), (5.5, math.sqrt(5 / 3), 4))
    assert t == pytest.approx(-3.5 / math.sqrt(0.75)) and t == pytest.approx(-4.04145, abs=1e-5)
    assert df == pytest.approx(0.5625 * 432 / 49)
    assert all(math.isnan(v) for v in welch((2.0, math.nan, 1), (5.5, 1.0, 4)))  # one seed: no t


def test_versus_compares_every_row_with_its_blocks_reference(tmp_path, capsys):
    for seed, best in enumerate([0.01, 0.02, 0.03]):
        write_run(tmp_path / f"n{seed}", ok_record("none", seed, best, best, names=MNIST1D))
    for seed, best in enumerate([0.04, 0.05, 0.06, 0.07]):
        write_run(tmp_path / f"k{seed}", ok_record("kd", seed, best, best, names=MNIST1D))
    write_run(tmp_path / "other", ok_record("kd", 0, 0.5, 0.5, names=CIFAR))  # a block without "none"
    rows, markdown = make_table([tmp_path], versus="none")
    by = {(r["dataset"], r["method"]): r for r in rows}
    kd, none, cifar = by[("mnist1d", "kd")], by[("mnist1d", "none")], by[("cifar100", "kd")]
    # the same numbers as above, in points: kd − none = 5.5 − 2 = +3.5, t = +4.04, df = 4.96
    assert kd["versus_delta"] == pytest.approx(3.5) and kd["versus_t"] == pytest.approx(4.04145, abs=1e-5)
    assert kd["versus_df"] == pytest.approx(0.5625 * 432 / 49)
    assert math.isnan(none["versus_delta"]) and math.isnan(cifar["versus_delta"])
    assert "Δ vs none" in markdown.splitlines()[0] and "| +3.50 | +4.0 (5.0) |" in markdown
    assert main([str(tmp_path), "--versus", "ls", "--no-plot"]) == 2
    assert "--versus ls: no row has that method or label" in capsys.readouterr().err
