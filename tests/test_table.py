"""kdx-table on run folders written by hand: every expected number below is computed by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from kdx.table import find_runs, main, make_table

PUBLISHED = {
    "source": "test table",
    "metric": "student/acc_best",
    "units": "percent",
    "seeds": None,
    "tolerance": 0.5,
    "teacher": 75.61,
    "student": {"none": 73.26, "kd": 74.92, "crd": 75.48},
}


def write_run(
    folder: Path,
    metrics: dict | None,
    *,
    published: dict | None = None,
    experiment: str | None = None,
    method: str = "kd",
    names: tuple[str, str, str] = ("cifar100", "wrn_40_2", "wrn_16_2"),
    seed: int = 0,
) -> Path:
    """A Hydra run folder: .hydra/{config,hydra,overrides}.yaml and (unless None) metrics.json."""
    hydra_dir = folder / ".hydra"
    hydra_dir.mkdir(parents=True)
    dataset, teacher, student = names
    config = {
        "seed": seed,
        "dataset": {"name": dataset},
        "teacher": {"name": teacher},
        "student": {"name": student},
        "method": {"_target_": f"kdx.methods.{method}"},
    }
    if published is not None:
        config["published"] = published
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"method": method, "experiment": experiment}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump([f"method={method}", f"seed={seed}"]))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def ok_metrics(method: str, seed: int, best: float, last: float, teacher: float = 0.7560, **extra) -> dict:
    return {
        "status": "ok",
        "method": method,
        "seed": seed,
        "dataset": "cifar100",
        "teacher": "wrn_40_2",
        "student": "wrn_16_2",
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
        **extra,
    }


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """A multirun folder: kd ×3 seeds, none ×2 seeds + 1 failed, and a run that never wrote metrics."""
    root = tmp_path / "multirun"
    kd = [(0.75, 0.74), (0.76, 0.75), (0.77, 0.79)]
    for seed, (best, last) in enumerate(kd):
        extra = {"fidelity/kernel_gap": 0.2} if seed == 0 else {}
        write_run(
            root / str(seed),
            ok_metrics("kd", seed, best, last, **extra),
            published=PUBLISHED,
            experiment="crd_cifar100/wrn_40_2_wrn_16_2",
            seed=seed,
        )
    for i, (seed, best) in enumerate([(0, 0.7330), (1, 0.7320)]):
        write_run(
            root / str(3 + i),
            ok_metrics("none", seed, best, best),
            published=PUBLISHED,
            experiment="crd_cifar100/wrn_40_2_wrn_16_2",
            method="none",
            seed=seed,
        )
    failed = {
        "status": "failed",
        "error": "loss is nan at epoch 3",
        "seed": 2,
        "method": "none",
        "dataset": "cifar100",
        "teacher": "wrn_40_2",
        "student": "wrn_16_2",
    }
    write_run(root / "5", failed, published=PUBLISHED, method="none", seed=2)
    write_run(root / "6", None, published=PUBLISHED, method="none", seed=3)  # crashed: no metrics.json
    return root


def rows_by_method(rows):
    return {r["method"]: r for r in rows}


def test_mean_std_delta_and_tolerance(sweep, tmp_path):
    rows, markdown = make_table([sweep], out=tmp_path / "out" / "table")
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
    # kernel_gap only in seed 0: a mean of one value, no std
    assert kd["fidelity/kernel_gap_n"] == 1 and kd["fidelity/kernel_gap_mean"] == pytest.approx(0.2)
    assert math.isnan(kd["fidelity/kernel_gap_std"])
    assert kd["time/fit_s_mean"] == pytest.approx(20.0)

    # none: 73.30, 73.20 → 73.25 ± 0.0707; Δ = 73.25 − 73.26 = −0.01, inside ±0.5; 1 failed, 1 missing
    assert none["n"] == 2 and none["failed"] == 1 and none["missing"] == 1 and none["seeds"] == "0 1"
    assert none["student/acc_best_mean"] == pytest.approx(73.25)
    assert none["student/acc_best_std"] == pytest.approx(math.sqrt(0.005))
    assert none["published"] == pytest.approx(73.26)
    assert none["delta"] == pytest.approx(-0.01)
    assert none["within_tolerance"] is True

    assert "76.00 ± 1.00" in markdown and "76.00 ± 2.65" in markdown
    assert "+1.08" in markdown and "no (±0.5)" in markdown
    assert "73.25 ± 0.07" in markdown and "-0.01" in markdown and "yes (±0.5)" in markdown
    assert "loss is nan at epoch 3" in markdown and "no metrics.json" in markdown


def test_files_written(sweep, tmp_path):
    prefix = tmp_path / "out" / "table"
    make_table([sweep], out=prefix)
    md, csv_path, png = (Path(f"{prefix}{ext}") for ext in (".md", ".csv", ".png"))
    assert md.read_text().startswith("| dataset |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(csv_path) as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert float(table["kd"]["student/acc_best_mean"]) == pytest.approx(76.0)
    assert float(table["kd"]["delta"]) == pytest.approx(1.08)
    assert table["kd"]["within_tolerance"] == "False" and table["none"]["within_tolerance"] == "True"
    assert int(table["none"]["failed"]) == 1 and int(table["none"]["missing"]) == 1


def test_groups_without_published_numbers_and_by_key(tmp_path):
    root = tmp_path / "runs"
    names = ("mnist1d", "cnn1d", "mlp")
    for seed, acc in enumerate([0.60, 0.64]):
        m = ok_metrics("kd", seed, acc, acc) | {"dataset": "mnist1d", "teacher": "cnn1d", "student": "mlp"}
        write_run(root / f"a{seed}", m, names=names, experiment="mnist1d/table", seed=seed)
    m = ok_metrics("kd", 0, 0.50, 0.50) | {"dataset": "mnist1d", "teacher": "cnn1d", "student": "mlp"}
    write_run(root / "b0", m, names=names, experiment=None, seed=0)

    rows, markdown = make_table([root])
    assert len(rows) == 1 and rows[0]["n"] == 3  # the four keys alone merge both experiments
    assert "published" not in markdown.splitlines()[0]
    assert math.isnan(rows[0]["delta"]) and rows[0]["within_tolerance"] is None

    rows, _ = make_table([root], by=["experiment"])
    by_exp = {r["experiment"]: r for r in rows}
    assert by_exp["mnist1d/table"]["n"] == 2
    assert by_exp["mnist1d/table"]["student/acc_best_mean"] == pytest.approx(62.0)
    assert by_exp["mnist1d/table"]["student/acc_best_std"] == pytest.approx(math.sqrt(8.0))
    assert by_exp[""]["n"] == 1


def test_fraction_units_and_scratch_alias(tmp_path):
    published = {"metric": "student/acc", "units": "fraction", "tolerance": 0.01, "scratch": 0.70}
    write_run(tmp_path / "r0", ok_metrics("none", 0, 0.80, 0.704), published=published, method="none")
    (row,) = make_table([tmp_path])[0]
    assert row["published"] == pytest.approx(70.0) and row["tolerance"] == pytest.approx(1.0)
    assert row["delta"] == pytest.approx(0.4) and row["within_tolerance"] is True  # on last-epoch acc


def test_cli(sweep, tmp_path, capsys):
    prefix = tmp_path / "cli" / "t"
    assert main([str(sweep), "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "| dataset | teacher → student | method |" in out and "76.00 ± 1.00" in out
    assert Path(f"{prefix}.png").is_file()
    assert main([str(tmp_path / "does-not-exist")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1


def test_single_metrics_file_and_no_double_count(sweep):
    runs = find_runs([sweep, sweep / "0", sweep / "0" / "metrics.json"])
    assert len(runs) == 7  # 6 metrics.json + 1 folder without one; each counted once
