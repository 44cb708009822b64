"""``kdx-table``: run folders → a paper-style table (markdown + CSV) and a figure (PNG).

    kdx-table logs/train/multiruns/2024-05-01_12-00-00 --out results/mnist1d
    kdx-table logs/crd_cifar100 --out results/crd --by experiment

Every ``metrics.json`` under the given folders is one run (a run folder, a multirun folder, or a
tree of them: the search is recursive). Runs are grouped by (dataset, teacher, student, method),
plus any ``--by`` keys, and each group becomes one row: mean ± sample std (n-1) over its seeds of
the student's best-epoch and last-epoch test accuracy, the teacher's accuracy, the fidelity
metrics, calibration and time. Accuracies (and top-1 agreement) are shown ×100.

When a run's composed config (``.hydra/config.yaml`` next to ``metrics.json``) pins published
numbers (the ``published`` block of the ``experiment/`` configs), the row gets the published
figure for its method, the difference ``our mean − published`` in percentage points, and whether
``|difference| ≤ published.tolerance``. Failed runs (``status: failed``) are counted, never
averaged; run folders with a config but no ``metrics.json`` (a crash, or a job still running) are
counted as missing.

Writes ``<out>.md``, ``<out>.csv`` (the same numbers, full precision, accuracies in percent) and
``<out>.png``, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("kdx.table")

GROUP_KEYS = ("dataset", "teacher", "student", "method")

# (metrics.json key, column label, scale, decimals). Scale 100 = shown in percent.
METRICS: tuple[tuple[str, str, float, int], ...] = (
    ("student/acc_best", "student best", 100.0, 2),
    ("student/acc", "student last", 100.0, 2),
    ("teacher/acc", "teacher", 100.0, 2),
    ("fidelity/agreement", "agreement", 100.0, 2),
    ("fidelity/kl", "KL(t‖s)", 1.0, 4),
    ("fidelity/kernel_gap", "kernel gap", 1.0, 4),
    ("student/ece", "ECE student", 1.0, 4),
    ("teacher/ece", "ECE teacher", 1.0, 4),
    ("time/fit_s", "fit s", 1.0, 1),
    ("throughput/train_samples_per_s", "samples/s", 1.0, 0),
)
PERCENT_KEYS = {key for key, _, scale, _ in METRICS if scale == 100.0}
# Published blocks may name the student-alone baseline "scratch"; kdx calls that method "none".
PUBLISHED_ALIASES = {"none": ("none", "scratch", "baseline")}
# Methods in this order first (baseline, then KD), then alphabetically.
METHOD_ORDER = ("none", "kd")


@dataclass
class Run:
    path: Path  # the run folder
    status: str  # ok | failed | missing
    keys: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    published: dict[str, Any] | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------------------
# Reading run folders


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def _select(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _hydra_choice(run_dir: Path, group: str) -> str | None:
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    value = _select(hydra_cfg, f"hydra.runtime.choices.{group}")
    return None if value is None else str(value)


def _extra_key(run_dir: Path, config: dict | None, key: str) -> str:
    """A --by key: a config group choice (``experiment``, ``optim`` ...) or a dotted config path."""
    value = _select(config, key) if config else None
    if value is None or isinstance(value, dict):
        value = _hydra_choice(run_dir, key)
    return "" if value is None else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_run(metrics_path: Path, by: Sequence[str] = ()) -> Run:
    run_dir = metrics_path.parent
    data = json.loads(metrics_path.read_text(encoding="utf-8"))
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    config = config if isinstance(config, dict) else None
    keys = {k: str(data.get(k) or _select(config, f"{k}.name") or "?") for k in GROUP_KEYS}
    if not data.get("method") and config is not None:
        keys["method"] = _hydra_choice(run_dir, "method") or "?"
    keys.update({k: _extra_key(run_dir, config, k) for k in by})
    status = str(data.get("status", "ok"))
    metrics = {}
    if status == "ok":
        metrics = {k: v for k, _, _, _ in METRICS if (v := _number(data.get(k))) is not None}
    published = config.get("published") if config else None
    seed = data.get("seed")
    return Run(
        path=run_dir,
        status=status,
        keys=keys,
        metrics=metrics,
        seed=None if seed is None else int(seed),
        published=published if isinstance(published, dict) else None,
        error=data.get("error"),
    )


def _missing_run(run_dir: Path, by: Sequence[str]) -> Run:
    """A run folder Hydra created but that has no metrics.json: crashed, killed, or still running."""
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    config = config if isinstance(config, dict) else {}
    keys = {k: str(_select(config, f"{k}.name") or "?") for k in GROUP_KEYS}
    keys["method"] = _hydra_choice(run_dir, "method") or "?"
    keys.update({k: _extra_key(run_dir, config, k) for k in by})
    seed = config.get("seed")
    return Run(
        path=run_dir,
        status="missing",
        keys=keys,
        seed=None if seed is None else int(seed),
        published=config.get("published") if isinstance(config.get("published"), dict) else None,
        error="no metrics.json (the job crashed or is still running)",
    )


def find_runs(paths: Iterable[str | Path], by: Sequence[str] = ()) -> list[Run]:
    """Every run under ``paths``: each metrics.json, and each Hydra run folder without one."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"kdx-table: no such file or folder: {root}")
        if root.is_file():
            candidates = [root] if root.name == "metrics.json" else []
            run_dirs: list[Path] = []
        else:
            candidates = sorted(root.rglob("metrics.json"))
            run_dirs = sorted(p.parent.parent for p in root.rglob(".hydra/config.yaml"))
            if (root / ".hydra" / "config.yaml").is_file():
                run_dirs.append(root)
        for metrics_path in candidates:
            run_dir = metrics_path.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            try:
                runs.append(read_run(metrics_path, by))
            except (OSError, json.JSONDecodeError) as err:
                log.warning("skipping %s: %s", metrics_path, err)
        for run_dir in run_dirs:
            resolved = run_dir.resolve()
            if resolved in seen or (run_dir / "metrics.json").exists():
                continue
            seen.add(resolved)
            runs.append(_missing_run(run_dir, by))
    return runs


# ------------------------------------------------------------------------------------------------
# Aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, 1
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var), n


def _published_for(published: dict[str, Any], method: str) -> float | None:
    student = published.get("student")
    for name in PUBLISHED_ALIASES.get(method, (method,)):
        for table in (student, published):
            if isinstance(table, dict) and _number(table.get(name)) is not None and name != "teacher":
                return float(table[name])
    return None


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def aggregate(runs: Sequence[Run], by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One dict per group: keys, counts, ``<metric>_mean/_std`` (accuracies in percent), published."""
    group_keys = (*GROUP_KEYS, *by)
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.keys.get(k, "") for k in group_keys), []).append(run)

    rows = []
    for key in sorted(groups, key=lambda k: (*k[:3], _method_rank(k[3]), *k[4:])):
        members = groups[key]
        ok = [r for r in members if r.status == "ok"]
        row: dict[str, Any] = dict(zip(group_keys, key))
        row["n"] = len(ok)
        row["failed"] = sum(r.status not in ("ok", "missing") for r in members)
        row["missing"] = sum(r.status == "missing" for r in members)
        row["seeds"] = " ".join(str(s) for s in sorted({r.seed for r in ok if r.seed is not None}))
        seeds = [r.seed for r in ok]
        if len(seeds) != len(set(seeds)):
            log.warning(
                "group %s holds several runs with the same seed: are different configs mixed? "
                "split them with --by (e.g. --by experiment)",
                "/".join(key),
            )
        for metric, _, scale, _ in METRICS:
            mean, std, n = _mean_std([r.metrics[metric] * scale for r in ok if metric in r.metrics])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
            row[f"{metric}_n"] = n

        pubs = [r.published for r in members if r.published]
        row.update(
            {
                "published": math.nan,
                "published_metric": "",
                "delta": math.nan,
                "tolerance": math.nan,
                "within_tolerance": None,
                "published_teacher": math.nan,
                "teacher_delta": math.nan,
                "published_source": "",
            }
        )
        if pubs:
            pub = pubs[0]
            if any(p != pub for p in pubs[1:]):
                log.warning("group %s: runs pin different published numbers; using the first", "/".join(key))
            metric = str(pub.get("metric", "student/acc_best"))
            # our accuracies are in percent; a block written as fractions is scaled to match
            unit = 100.0 if metric in PERCENT_KEYS and str(pub.get("units", "percent")) == "fraction" else 1.0
            row["published_metric"] = metric
            row["published_source"] = str(pub.get("source", ""))
            tolerance = _number(pub.get("tolerance"))
            tolerance = None if tolerance is None else tolerance * unit
            row["tolerance"] = math.nan if tolerance is None else tolerance
            value = _published_for(pub, key[3])
            if value is not None:
                row["published"] = value * unit
                ours = row.get(f"{metric}_mean", math.nan)
                if not math.isnan(ours):
                    row["delta"] = ours - row["published"]
                    if tolerance is not None:
                        row["within_tolerance"] = abs(row["delta"]) <= tolerance + 1e-9
            teacher = _number(pub.get("teacher"))
            if teacher is not None:
                row["published_teacher"] = teacher * unit
                if not math.isnan(row["teacher/acc_mean"]):
                    row["teacher_delta"] = row["teacher/acc_mean"] - row["published_teacher"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Rendering


def _fmt(mean: float, std: float, decimals: int) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _signed(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.2f}"


ACCURACY_KEYS = ("student/acc_best", "student/acc", "teacher/acc")


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in body),
    ]


def to_markdown(rows: Sequence[dict[str, Any]], by: Sequence[str] = ()) -> str:
    """Two GitHub markdown tables: accuracies (with the published comparison and failure counts),
    then fidelity, calibration and time. Columns with no value in any row are left out."""
    present = [m for m in METRICS if any(r[f"{m[0]}_n"] > 0 for r in rows)]
    accuracy = [m for m in present if m[0] in ACCURACY_KEYS]
    others = [m for m in present if m[0] not in ACCURACY_KEYS]
    has_pub = any(not math.isnan(r["published"]) for r in rows)
    has_pub_teacher = any(not math.isnan(r["published_teacher"]) for r in rows)
    has_missing = any(r["missing"] for r in rows)

    def keys(r: dict[str, Any]) -> list[str]:
        return [r["dataset"], f"{r['teacher']} → {r['student']}", r["method"], *(str(r[k]) for k in by)]

    key_header = ["dataset", "teacher → student", "method", *by]
    header = [*key_header, "n", *(label for _, label, _, _ in accuracy)]
    if has_pub:
        header += ["published", "Δ", "within tol."]
    if has_pub_teacher:
        header += ["teacher published", "teacher Δ"]
    header += ["failed"] + (["missing"] if has_missing else [])
    body = []
    for r in rows:
        cells = [*keys(r), str(r["n"])]
        cells += [_fmt(r[f"{key}_mean"], r[f"{key}_std"], dec) for key, _, _, dec in accuracy]
        if has_pub:
            tol = r["within_tolerance"]
            flag = (
                "–" if tol is None else (f"yes (±{r['tolerance']:g})" if tol else f"no (±{r['tolerance']:g})")
            )
            cells += [_fmt(r["published"], math.nan, 2), _signed(r["delta"]), flag]
        if has_pub_teacher:
            cells += [_fmt(r["published_teacher"], math.nan, 2), _signed(r["teacher_delta"])]
        cells += [str(r["failed"])] + ([str(r["missing"])] if has_missing else [])
        body.append(cells)
    lines = _md_table(header, body)
    if others:
        lines += [
            "",
            *_md_table(
                [*key_header, *(label for _, label, _, _ in others)],
                [
                    [*keys(r), *(_fmt(r[f"{key}_mean"], r[f"{key}_std"], dec) for key, _, _, dec in others)]
                    for r in rows
                ],
            ),
        ]
    notes = []
    if rows:
        notes.append(
            "Accuracies and agreement in % (×100); mean ± sample std over seeds (n = successful "
            "runs); student best = test accuracy of the best-validation epoch, last = of the last epoch."
        )
    metrics = sorted({r["published_metric"] for r in rows if r["published_metric"]})
    if has_pub:
        notes.append(f"Δ = our mean − published, in points, on {', '.join(metrics)}.")
        for source in sorted({r["published_source"] for r in rows if r["published_source"]}):
            notes.append(f"Published: {source}.")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    frame.to_csv(path, index=False, float_format="%.6g")


def plot(
    rows: Sequence[dict[str, Any]], path: Path, metric: str = "student/acc_best", by: Sequence[str] = ()
) -> None:
    """Accuracy per method (mean ± std over seeds), one panel per (dataset, teacher → student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault((r["dataset"], r["teacher"], r["student"]), []).append(r)
    n = max(1, len(panels))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, ((dataset, teacher, student), members) in zip(axes.flat, panels.items()):
        labels = [m["method"] + (f" [{', '.join(str(m[k]) for k in by)}]" if by else "") for m in members]
        means = [m[f"{metric}_mean"] for m in members]
        stds = [0.0 if math.isnan(m[f"{metric}_std"]) else m[f"{metric}_std"] for m in members]
        xs = list(range(len(members)))
        ax.errorbar(
            [x - 0.08 for x in xs],
            means,
            yerr=stds,
            fmt="o",
            capsize=4,
            color="tab:blue",
            label="ours (mean ± std)",
        )
        pub = [(x + 0.08, m["published"]) for x, m in zip(xs, members) if not math.isnan(m["published"])]
        if pub:
            ax.scatter(
                [p[0] for p in pub],
                [p[1] for p in pub],
                marker="D",
                color="black",
                zorder=3,
                label="published",
            )
        teacher_acc = [m["teacher/acc_mean"] for m in members if not math.isnan(m["teacher/acc_mean"])]
        if teacher_acc:
            ax.axhline(
                sum(teacher_acc) / len(teacher_acc),
                color="tab:red",
                linestyle="--",
                linewidth=1,
                label="teacher (ours)",
            )
        finite = [v + sign * e for v, e in zip(means, stds) if not math.isnan(v) for sign in (-1, 1)]
        finite += [p[1] for p in pub] + teacher_acc
        if finite:
            low, high = min(finite), max(finite)
            pad = max(0.5, 0.1 * (high - low))
            ax.set_ylim(low - pad, high + pad)
        ax.set_xlim(-0.6, len(members) - 0.4)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{dataset}: {teacher} → {student}", fontsize=9)
        ax.set_ylabel(f"{metric} (%)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_table(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    by: Sequence[str] = (),
    metric: str = "student/acc_best",
    figure: bool = True,
) -> tuple[list[dict[str, Any]], str]:
    """Read, aggregate and (when ``out`` is given) write ``<out>.md``, ``.csv`` and ``.png``."""
    runs = find_runs(paths, by)
    rows = aggregate(runs, by)
    markdown = to_markdown(rows, by)
    failures = [r for r in runs if r.status != "ok"]
    if failures:
        markdown += (
            "\nFailed or missing runs:\n\n"
            + "\n".join(
                f"- `{r.path}` ({'/'.join(r.keys[k] for k in GROUP_KEYS)}, seed {r.seed}): {r.status}: {r.error}"
                for r in failures
            )
            + "\n"
        )
    if out is not None:
        prefix = Path(out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{prefix}.md").write_text(markdown, encoding="utf-8")
        write_csv(rows, Path(f"{prefix}.csv"))
        if figure:
            plot(rows, Path(f"{prefix}.png"), metric, by)
    return rows, markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdx-table",
        description="Run folders / multirun folders (searched recursively for metrics.json) → "
        "<out>.md, <out>.csv, <out>.png: mean ± std over seeds per (dataset, teacher, "
        "student, method), with the difference to published numbers when the "
        "experiment config pins them.",
    )
    parser.add_argument("paths", nargs="+", help="run folders, multirun folders, or metrics.json files")
    parser.add_argument("--out", default=None, help="output prefix (writes <out>.md, <out>.csv, <out>.png)")
    parser.add_argument(
        "--by",
        action="append",
        default=[],
        help="extra grouping key: a config group (experiment, optim...) or a dotted "
        "config path (method.temperature); repeatable",
    )
    parser.add_argument(
        "--metric",
        default="student/acc_best",
        choices=[k for k in PERCENT_KEYS if k.startswith("student/")],
        help="accuracy drawn in the figure (default: student/acc_best)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="kdx-table: %(message)s")
    try:
        rows, markdown = make_table(args.paths, args.out, args.by, args.metric, figure=not args.no_plot)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    if not rows:
        print(f"kdx-table: no metrics.json under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    print(markdown)
    if args.out:
        print(f"wrote {args.out}.md, {args.out}.csv" + ("" if args.no_plot else f", {args.out}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
