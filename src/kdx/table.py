"""``kdx-table``: run folders → a paper-style table (markdown + CSV) and a figure (PNG).

    kdx-table logs/train/multiruns/2024-05-01_12-00-00 --out results/mnist1d
    kdx-table logs/crd_cifar100 --out results/crd --by experiment
    kdx-table run1/ run2/metrics.json --by method.temperature --no-plot
    kdx-table logs/mnist1d_table --versus none   # each row against the scratch run, Welch's t

Every ``metrics.json`` under the given paths is one run (a run folder, a multirun folder, or a
tree of them: the search is recursive). ``metrics.json`` is the only thing read, as a
:class:`~kdx.record.RunRecord` — Hydra's ``.hydra/`` folders may be deleted. What the table uses
from a run's record:

- ``status`` (``ok`` | ``failed`` | ``diverged`` | ...), with ``error`` / ``error_type`` when not ok;
- ``seed``, ``dataset``, ``teacher``, ``student``, ``method``: display names;
- ``label`` (optional): replaces the method as the row name, so a method run with a control switch
  (``backward-step0``) forms a row of its own;
- ``choices`` (the run's Hydra group choices) and ``config`` (its resolved config): ``--by`` keys
  are looked up in them — a dotted config path (``method.temperature``) or a group (``experiment``);
- ``published``: the experiment's published numbers (``conf/experiment/crd_cifar100/_recipe.yaml``
  describes the block), or null;
- the figures: ``student/acc_best``, ``student/acc``, ``teacher/acc``, ``fidelity/*``, ECE, time.

Runs are grouped once, by (dataset, teacher, student, row name) plus any ``--by`` keys; each group
is one row: mean ± sample std (n − 1) over its successful runs. Accuracies, agreement and ECE are
shown in percent. When the runs pin published numbers, the row gets the published figure for its
label or method, ``Δ = our mean − published`` in percentage points and whether ``|Δ| ≤ tolerance``.
``--versus LABEL`` compares every row with the row ``LABEL`` of its block (a scratch run, a
control): the difference of the means and Welch's t with its degrees of freedom.
Runs that did not succeed are counted (``failed``; ``missing`` for a record still ``running``),
never averaged, and listed under the table with their error. A folder whose ``metrics.json`` cannot
be read or is malformed is skipped with a warning naming it; a job folder of a sweep without any
``metrics.json`` (killed before it could write one) is listed too.

``--out DIR`` writes ``DIR/table.md`` (also printed), ``DIR/table.csv`` (the same numbers, full
precision) and ``DIR/table.png`` (one panel per dataset and teacher → student pair, successful rows
only). ``--out DIR/name.md`` picks the file name: ``DIR/name.{md,csv,png}``.
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

from kdx.record import RecordError, RunRecord, read_record

log = logging.getLogger("kdx.table")

NAME_KEYS = ("dataset", "teacher", "student")
# A row: the names above plus the row name (the run's label, or its method when it has none).
GROUP_KEYS = (*NAME_KEYS, "method")

# (metrics.json key, column label, scale, decimals). Scale 100 = shown in percent.
METRICS: tuple[tuple[str, str, float, int], ...] = (
    ("student/acc_best", "student best", 100.0, 2),
    ("student/acc", "student last", 100.0, 2),
    ("teacher/acc", "teacher", 100.0, 2),
    ("fidelity/agreement", "agreement", 100.0, 2),
    ("fidelity/kl", "KL(t‖s)", 1.0, 4),
    ("fidelity/kernel_gap", "kernel gap", 1.0, 4),
    ("fidelity/cka", "CKA", 1.0, 4),
    ("student/ece", "ECE student", 100.0, 2),
    ("teacher/ece", "ECE teacher", 100.0, 2),
    ("time/fit_s", "fit s", 1.0, 1),
    ("throughput/train_samples_per_s", "samples/s", 1.0, 0),
)
PERCENT_KEYS = {key for key, _, scale, _ in METRICS if scale == 100.0}
ACCURACY_KEYS = ("student/acc_best", "student/acc", "teacher/acc")
# Published blocks may name the student-alone baseline "scratch"; kdx calls that method "none".
PUBLISHED_ALIASES = {"none": ("none", "scratch", "baseline")}
# Methods in this order first (baseline, then KD), then alphabetically.
METHOD_ORDER = ("none", "kd")
# A record with this status is a run that has not finished (yet): counted as missing, not failed.
UNFINISHED = "running"
OUT_NAME = "table"


@dataclass
class Run:
    path: Path  # the run folder
    status: str  # ok | failed | diverged | ... | running
    keys: dict[str, str]  # GROUP_KEYS and the --by keys, as shown in the table
    method: str  # the registered method (the row name is the label when there is one)
    metrics: dict[str, float] = field(default_factory=dict)
    seed: int | str | None = None  # a string only in the record of a run that failed on its seed
    published: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    tags: tuple[str, ...] = ()


@dataclass
class Found:
    """What a search found: the runs, the folders skipped, and sweep job folders without a record."""

    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    without_record: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Reading metrics.json


def _select(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _by_value(record: RunRecord, key: str) -> str:
    """A --by key: a dotted path in the run's config, else a group choice, else a record field."""
    value = _select(record.config, key)
    if value is None or isinstance(value, (dict, list)):
        value = (record.choices or {}).get(key)
    if value is None:
        value = record.get(key)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def read_run(metrics_path: Path, by: Sequence[str] = ()) -> Run:
    """One run from its metrics.json; ``OSError`` / :class:`~kdx.record.RecordError`."""
    record = read_record(metrics_path)
    choices = record.choices or {}
    names = {k: str(record.get(k) or choices.get(k) or "?") for k in (*NAME_KEYS, "method")}
    method = names.pop("method")
    keys = {**names, "method": record.label or method}
    keys.update({k: _by_value(record, k) for k in by})
    metrics = {}
    if record.ok:
        metrics = {k: v for k, _, _, _ in METRICS if (v := _number(record.get(k))) is not None}
    return Run(
        path=metrics_path.parent,
        status=record.status,
        keys=keys,
        method=method,
        metrics=metrics,
        seed=record.seed,
        published=record.published,
        error=record.error,
        error_type=record.error_type,
        tags=tuple(str(t) for t in record.tags or ()),
    )


def _is_visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def search(paths: Iterable[str | Path], by: Sequence[str] = ()) -> Found:
    """Every run under ``paths`` (each metrics.json once), what was skipped, and what has none."""
    found = Found()
    seen: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"kdx-table: no such file or folder: {root}")
        if root.is_file():
            candidates = [root] if root.name == "metrics.json" else []
        else:
            candidates = sorted(p for p in root.rglob("metrics.json") if _is_visible(p, root))
        for metrics_path in candidates:
            run_dir = metrics_path.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            try:
                found.runs.append(read_run(metrics_path, by))
            except (OSError, RecordError) as err:
                reason = err.reason if isinstance(err, RecordError) else f"{type(err).__name__}: {err}"
                log.warning("skipping %s: unreadable metrics.json (%s)", metrics_path.parent, reason)
                found.skipped.append((metrics_path.parent, reason))
        if root.is_dir():
            found.without_record += _job_folders_without_record(root, candidates)
    found.without_record = sorted(set(found.without_record) - seen)
    return found


def _job_folders_without_record(root: Path, records: Sequence[Path]) -> list[Path]:
    """Numbered sweep job folders (Hydra's 0, 1, 2 ...) under ``root``, beside ones that hold a
    metrics.json but holding none themselves: jobs killed before they could write their record."""
    out = []
    sweeps = {p.parent.parent for p in records if p.parent.name.isdigit()}
    for sweep in sweeps:
        if sweep != root and root not in sweep.parents:
            continue  # asked for one job of a sweep: its siblings were not asked for
        for job in sweep.iterdir():
            if job.is_dir() and job.name.isdigit() and not any(job.rglob("metrics.json")):
                out.append(job.resolve())
    return out


def find_runs(paths: Iterable[str | Path], by: Sequence[str] = ()) -> list[Run]:
    """Every readable run under ``paths``; unreadable ones are skipped with a warning."""
    return search(paths, by).runs


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


def welch(a: tuple[float, float, int], b: tuple[float, float, int]) -> tuple[float, float]:
    """Welch's t of ``mean_a − mean_b`` from two (mean, sample std, n), and its Welch–Satterthwaite
    degrees of freedom; NaN when either side has fewer than two values."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2 or math.isnan(sa) or math.isnan(sb):
        return math.nan, math.nan
    va, vb = sa * sa / na, sb * sb / nb
    if va + vb == 0:
        return (math.nan if ma == mb else math.copysign(math.inf, ma - mb)), math.nan
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    return t, df


def add_versus(
    rows: Sequence[dict[str, Any]], reference: str, metric: str = "student/acc_best", by: Sequence[str] = ()
) -> None:
    """Each row's difference to the ``reference`` row (a method or run label) of its own (dataset,
    teacher, student, --by) block on ``metric``, with Welch's t and degrees of freedom: the control
    comparison a claim needs, computed rather than eyeballed. Rows of a block without the reference
    get NaN."""
    block_keys = (*NAME_KEYS, *by)
    refs = {tuple(r[k] for k in block_keys): r for r in rows if r["method"] == reference}
    for row in rows:
        ref = refs.get(tuple(row[k] for k in block_keys))
        row["versus"], row["versus_metric"] = reference, metric
        row["versus_delta"] = row["versus_t"] = row["versus_df"] = math.nan
        if ref is None or ref is row:
            continue
        stats = [(r[f"{metric}_mean"], r[f"{metric}_std"], r[f"{metric}_n"]) for r in (row, ref)]
        row["versus_delta"] = stats[0][0] - stats[1][0]
        row["versus_t"], row["versus_df"] = welch(*stats)


def _published_for(published: dict[str, Any], names: Sequence[str]) -> float | None:
    """The published figure of the first of ``names`` (row label, then method) the block has."""
    student = published.get("student")
    for name in names:
        for alias in PUBLISHED_ALIASES.get(name, (name,)):
            for table in (student, published):
                if alias != "teacher" and isinstance(table, dict) and _number(table.get(alias)) is not None:
                    return float(table[alias])
    return None


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _group_name(key: Sequence[str]) -> str:
    return "/".join(k for k in key if k)


def aggregate(runs: Sequence[Run], by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One dict per group: keys, counts, ``<metric>_mean/_std/_n`` (percent where shown so),
    the published comparison."""
    group_keys = (*GROUP_KEYS, *by)
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.keys[k] for k in group_keys), []).append(run)

    def order(key: tuple[str, ...]) -> tuple:
        methods = sorted({r.method for r in groups[key]}, key=_method_rank)
        return (*key[:3], _method_rank(methods[0]), key[3], *key[4:])

    rows = []
    for key in sorted(groups, key=order):
        members = groups[key]
        ok = [r for r in members if r.status == "ok"]
        methods = sorted({r.method for r in members}, key=_method_rank)
        row: dict[str, Any] = dict(zip(group_keys, key))
        row["base_method"] = " ".join(methods)
        row["n"] = len(ok)
        row["failed"] = sum(r.status not in ("ok", UNFINISHED) for r in members)
        row["missing"] = sum(r.status == UNFINISHED for r in members)
        row["seeds"] = " ".join(str(s) for s in sorted({r.seed for r in ok if r.seed is not None}))
        seeds = [r.seed for r in ok]
        if len(seeds) != len(set(seeds)):
            log.warning(
                "group %s holds several runs with the same seed: are different configs mixed? "
                "split them with --by (e.g. --by experiment)",
                _group_name(key),
            )
        for metric, _, scale, _ in METRICS:
            mean, std, n = _mean_std([r.metrics[metric] * scale for r in ok if metric in r.metrics])
            row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_n"] = mean, std, n
        row.update(_published_columns(row, members, names=(key[3], *methods), group=_group_name(key)))
        rows.append(row)
    return rows


# ``published.reported`` (per source): which of our figures the source's number is. "unsettled":
# the source does not say; Δ is shown on both, and no verdict is given.
REPORTED = {"last": "student/acc", "best": "student/acc_best"}
UNSETTLED = "unsettled"


def _reported(published: dict[str, Any], names: Sequence[str]) -> tuple[str | None, str]:
    """``(reported, source)`` for the first of ``names`` that ``published.sources`` lists, else the
    block's own ``reported`` (None: the block predates it and names a ``metric``) and ``source``."""
    sources = published.get("sources")
    if isinstance(sources, dict):
        for name in names:
            for alias in PUBLISHED_ALIASES.get(name, (name,)):
                entry = sources.get(alias)
                if isinstance(entry, dict) and entry.get("reported"):
                    return str(entry["reported"]), str(entry.get("source") or published.get("source") or "")
    reported = published.get("reported")
    return (None if reported is None else str(reported)), str(published.get("source") or "")


def _published_columns(row: dict[str, Any], members: Sequence[Run], names: Sequence[str], group: str) -> dict:
    out: dict[str, Any] = {
        "published": math.nan,
        "published_metric": "",
        "published_reported": "",
        "delta": math.nan,
        "delta_best": math.nan,
        "tolerance": math.nan,
        "within_tolerance": None,
        "published_teacher": math.nan,
        "teacher_delta": math.nan,
        "published_source": "",
    }
    pubs = [r.published for r in members if r.published]
    if not pubs:
        return out
    pub = pubs[0]
    if any(p != pub for p in pubs[1:]):
        log.warning("group %s: runs pin different published numbers; using the first", group)
    reported, source = _reported(pub, names)
    if reported is not None and reported not in (*REPORTED, UNSETTLED):
        log.warning(
            "group %s: published.reported=%r is not last, best or unsettled; using last", group, reported
        )
        reported = "last"
    metric = (
        REPORTED.get(reported or "", "student/acc")
        if reported
        else str(pub.get("metric", "student/acc_best"))
    )
    # our accuracies are in percent; a block written as fractions is scaled to match
    unit = 100.0 if metric in PERCENT_KEYS and str(pub.get("units", "percent")) == "fraction" else 1.0
    out["published_metric"] = metric
    out["published_reported"] = reported or ""
    out["published_source"] = source
    tolerance = _number(pub.get("tolerance"))
    tolerance = None if tolerance is None else tolerance * unit
    out["tolerance"] = math.nan if tolerance is None else tolerance
    value = _published_for(pub, names)
    if value is not None:
        out["published"] = value * unit
        ours = row.get(f"{metric}_mean", math.nan)
        if not math.isnan(ours):
            out["delta"] = ours - out["published"]
            if tolerance is not None and reported != UNSETTLED:
                out["within_tolerance"] = abs(out["delta"]) <= tolerance + 1e-9
        if reported == UNSETTLED:  # Δ on the best epoch's figure too; no verdict
            out["delta_best"] = row.get("student/acc_best_mean", math.nan) - out["published"]
    teacher = _number(pub.get("teacher"))
    if teacher is not None:
        out["published_teacher"] = teacher * unit
        if not math.isnan(row["teacher/acc_mean"]):
            out["teacher_delta"] = row["teacher/acc_mean"] - out["published_teacher"]
    return out


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
    versus = next((r["versus"] for r in rows if "versus" in r), None)
    versus_metric = next((r["versus_metric"] for r in rows if "versus_metric" in r), None)

    def keys(r: dict[str, Any]) -> list[str]:
        return [r["dataset"], f"{r['teacher']} → {r['student']}", r["method"], *(str(r[k]) for k in by)]

    key_header = ["dataset", "teacher → student", "method", *by]
    header = [*key_header, "n", *(label for _, label, _, _ in accuracy)]
    if has_pub:
        header += ["published", "Δ", "within tol."]
    if has_pub_teacher:
        header += ["teacher published", "teacher Δ"]
    if versus:
        header += [f"Δ vs {versus}", "Welch t (df)"]
    header += ["failed"] + (["missing"] if has_missing else [])
    body = []
    for r in rows:
        cells = [*keys(r), str(r["n"])]
        cells += [_fmt(r[f"{key}_mean"], r[f"{key}_std"], dec) for key, _, _, dec in accuracy]
        if has_pub:
            tol = r["within_tolerance"]
            flag = "–" if tol is None else f"{'yes' if tol else 'no'} (±{r['tolerance']:g})"
            delta = _signed(r["delta"])
            if r.get("published_reported") == UNSETTLED:
                delta, flag = f"{delta} last / {_signed(r['delta_best'])} best", "unsettled"
            elif r.get("published_reported"):
                delta = f"{delta} ({r['published_reported']})"
            cells += [_fmt(r["published"], math.nan, 2), delta, flag]
        if has_pub_teacher:
            cells += [_fmt(r["published_teacher"], math.nan, 2), _signed(r["teacher_delta"])]
        if versus:
            t, df = r["versus_t"], r["versus_df"]
            cells += [
                "" if math.isnan(r["versus_delta"]) else _signed(r["versus_delta"]),
                "" if math.isnan(t) else f"{t:+.1f} ({df:.1f})" if not math.isnan(df) else f"{t:+.1f}",
            ]
        cells += [str(r["failed"])] + ([str(r["missing"])] if has_missing else [])
        body.append(cells)
    lines = _md_table(header, body)
    if others:
        other_body = [
            [*keys(r), *(_fmt(r[f"{key}_mean"], r[f"{key}_std"], dec) for key, _, _, dec in others)]
            for r in rows
        ]
        lines += ["", *_md_table([*key_header, *(label for _, label, _, _ in others)], other_body)]
    notes = []
    if rows:
        notes.append(
            "Accuracies, agreement and ECE in % (×100); mean ± sample std over seeds (n = successful "
            "runs); student best = test accuracy of the best-validation epoch, last = of the last epoch."
        )
    if versus:
        notes.append(
            f"Δ vs {versus} = this row's mean − the {versus} row's mean of the same block on "
            f"{versus_metric}, in points; Welch t (df) = that difference over its standard error from the "
            "two rows' std and n (|t| ≳ 2.5–3 at these df is a difference the seeds resolve)."
        )
    if has_pub:
        metrics = sorted({r["published_metric"] for r in rows if r["published_metric"]})
        notes.append(f"Δ = our mean − published, in points, on {', '.join(metrics)}.")
        if any(r.get("published_reported") for r in rows):
            notes.append(
                "(last) / (best): the figure the source reports, compared on ours of the same kind "
                "(last = student/acc, the last epoch; best = student/acc_best); unsettled: the source "
                "does not say, Δ shown on both, no verdict."
            )
        for source in sorted({r["published_source"] for r in rows if r["published_source"]}):
            notes.append(f"Published: {source}.")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"


def _problems_markdown(found: Found) -> str:
    """Runs that did not succeed, folders skipped, job folders without a record: one line each."""
    parts = []
    failures = [r for r in found.runs if r.status != "ok"]
    if failures:
        lines = []
        for r in failures:
            error = (
                f"{r.error_type}: {r.error}" if r.error_type and r.error else (r.error or "no error given")
            )
            names = "/".join(r.keys[k] for k in GROUP_KEYS)
            lines.append(f"- `{r.path}` ({names}, seed {r.seed}): {r.status}: {error}")
        parts.append("Failed or unfinished runs:\n\n" + "\n".join(lines))
    if found.skipped:
        parts.append(
            "Skipped (unreadable or malformed metrics.json):\n\n"
            + "\n".join(f"- `{path}`: {reason}" for path, reason in found.skipped)
        )
    if found.without_record:
        parts.append(
            "Job folders without metrics.json (killed before writing it, or still starting):\n\n"
            + "\n".join(f"- `{path}`" for path in found.without_record)
        )
    return "".join(f"\n{part}\n" for part in parts)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    frame.to_csv(path, index=False, float_format="%.6g")


def draw(rows: Sequence[dict[str, Any]], metric: str = "student/acc_best", by: Sequence[str] = ()) -> Any:
    """The figure: ``metric`` per row (mean ± std over seeds), one panel per (dataset, teacher →
    student). Rows without a successful run are not drawn, nor are panels left with no row; the
    legend sits below the panels, clear of every point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if not math.isnan(r[f"{metric}_mean"]):
            panels.setdefault((r["dataset"], r["teacher"], r["student"]), []).append(r)
    if not panels:
        fig, ax = plt.subplots(figsize=(5.2, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no successful run has {metric}", ha="center", va="center")
        return fig
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows + 0.6), squeeze=False)
    legend: dict[str, Any] = {}  # label → handle, over every panel
    for ax, ((dataset, teacher, student), members) in zip(axes.flat, panels.items()):
        _plot_panel(ax, members, metric, by, legend)
        ax.set_title(f"{dataset}: {teacher} → {student}", fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.remove()
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=8)
    # the bottom strip (about 0.5 inch) is the legend's, outside every panel
    fig.tight_layout(rect=(0.0, 0.5 / fig.get_figheight(), 1.0, 1.0))
    return fig


def plot(
    rows: Sequence[dict[str, Any]], path: Path, metric: str = "student/acc_best", by: Sequence[str] = ()
) -> None:
    """``draw`` saved as a PNG."""
    fig = draw(rows, metric, by)
    import matplotlib.pyplot as plt  # after draw() chose the Agg backend

    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_panel(
    ax: Any, members: Sequence[dict[str, Any]], metric: str, by: Sequence[str], legend: dict
) -> None:
    labels = [m["method"] + (f" [{', '.join(str(m[k]) for k in by)}]" if by else "") for m in members]
    means = [m[f"{metric}_mean"] for m in members]
    stds = [0.0 if math.isnan(m[f"{metric}_std"]) else m[f"{metric}_std"] for m in members]
    xs = list(range(len(members)))
    legend["ours (mean ± std)"] = ax.errorbar(
        [x - 0.08 for x in xs], means, yerr=stds, fmt="o", capsize=4, color="tab:blue"
    )
    pub = [(x + 0.08, m["published"]) for x, m in zip(xs, members) if not math.isnan(m["published"])]
    if pub:
        legend["published"] = ax.scatter(
            [p[0] for p in pub], [p[1] for p in pub], marker="D", color="black", zorder=3
        )
    teacher_acc = [m["teacher/acc_mean"] for m in members if not math.isnan(m["teacher/acc_mean"])]
    if teacher_acc:
        legend["teacher (ours)"] = ax.axhline(
            sum(teacher_acc) / len(teacher_acc), color="tab:red", linestyle="--", linewidth=1
        )
    finite = [v + sign * e for v, e in zip(means, stds) for sign in (-1, 1)]
    finite += [p[1] for p in pub] + teacher_acc
    low, high = min(finite), max(finite)
    pad = max(0.5, 0.1 * (high - low))
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(-0.6, len(members) - 0.4)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def output_files(out: str | Path) -> dict[str, Path]:
    """``--out DIR`` → ``DIR/table.{md,csv,png}``; ``--out DIR/name.md`` → ``DIR/name.{md,csv,png}``."""
    out = Path(out)
    prefix = out.with_suffix("") if out.suffix in (".md", ".csv", ".png") else out / OUT_NAME
    return {ext: prefix.with_name(f"{prefix.name}.{ext}") for ext in ("md", "csv", "png")}


def make_table(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    by: Sequence[str] = (),
    metric: str = "student/acc_best",
    figure: bool = True,
    versus: str | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Read, aggregate and (when ``out`` is given) write the files of ``output_files(out)``;
    ``versus``: a method or run label every row is compared with (:func:`add_versus`)."""
    found = search(paths, by)
    rows = aggregate(found.runs, by)
    if versus:
        if not any(r["method"] == versus for r in rows):
            labels = sorted({r["method"] for r in rows})
            raise ValueError(
                f"--versus {versus}: no row has that method or label; the rows are {', '.join(labels)}"
            )
        add_versus(rows, versus, metric, by)
    markdown = to_markdown(rows, by) + _problems_markdown(found)
    if out is not None:
        files = output_files(out)
        files["md"].parent.mkdir(parents=True, exist_ok=True)
        files["md"].write_text(markdown, encoding="utf-8")
        write_csv(rows, files["csv"])
        if figure:
            plot(rows, files["png"], metric, by)
    return rows, markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdx-table",
        description="Run folders / multirun folders (searched recursively for metrics.json) → "
        "table.md, table.csv, table.png: mean ± std over seeds per (dataset, teacher, student, "
        "method or run label), with the difference to published numbers when the experiment "
        "pins them.",
    )
    parser.add_argument("paths", nargs="+", help="run folders, multirun folders, or metrics.json files")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (writes OUT/table.md, .csv, .png); OUT/name.md picks the file name",
    )
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
        choices=sorted(k for k in PERCENT_KEYS if k.startswith("student/acc")),
        help="accuracy drawn in the figure (default: student/acc_best)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--versus",
        default=None,
        metavar="LABEL",
        help="a method or run label (e.g. none, or a control's label): every row of the same block gets "
        "its difference to it on --metric, with Welch's t",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="kdx-table: %(message)s")
    try:
        rows, markdown = make_table(
            args.paths, args.out, args.by, args.metric, figure=not args.no_plot, versus=args.versus
        )
    except (FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    if not rows:
        print(f"kdx-table: no readable metrics.json under {' '.join(args.paths)}", file=sys.stderr)
        if markdown.strip():
            print(markdown, file=sys.stderr)
        return 1
    print(markdown)
    if args.out:
        files = output_files(args.out)
        written = [files["md"], files["csv"]] + ([] if args.no_plot else [files["png"]])
        print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
