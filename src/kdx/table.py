"""``kdx-table``: run folders → a paper-style table (markdown + CSV) and a figure (PNG).

    kdx-table logs/train/multiruns/2024-05-01_12-00-00 --out results/mnist1d
    kdx-table logs/crd_cifar100 --out results/crd --by experiment
    kdx-table run1/ run2/metrics.json --by method.temperature --no-plot
    kdx-table logs/mnist1d_table --versus none   # each row against the scratch run, Welch's t

Every ``metrics.json`` under the given paths is one run (a run folder, a multirun folder, or a
tree of them: the search is recursive). ``metrics.json`` is the only thing read, as a
:class:`~kdx.record.RunRecord` — Hydra's ``.hydra/`` folders may be deleted. What the table uses
from a run's record:

- ``status`` (``ok`` | ``no_learning`` | ``failed`` | ``diverged`` | ...), with ``error`` / ``error_type`` when not ok;
- ``seed``, ``dataset``, ``teacher``, ``student``, ``method``: display names;
- ``label`` (optional): replaces the method as the row name, so a method run with a control switch
  (``backward-step0``) forms a row of its own;
- ``choices`` (the run's Hydra group choices) and ``config`` (its resolved config): ``--by`` keys
  are looked up in them — a dotted config path (``method.temperature``) or a group (``experiment``);
- ``published``: the experiment's published numbers (``conf/experiment/crd_cifar100/_recipe.yaml``
  describes the block), or null;
- the figures: ``student/acc_best``, ``student/acc``, ``teacher/acc``, ``fidelity/*``, ECE, time.

Runs are grouped once, by (dataset, teacher, student, row name) plus every config value that
differs between those runs (seed, paths and the run's own folder aside; lists and mappings shown as
``[100,100]``, ``{a:1}``), or, with ``--by``, plus those keys only (a row that then merges
different configs is warned about). Runs of different teacher checkpoints (``teacher/sha256``)
never share a row, unless each seed has its own teacher (every run of seed s, whatever its row, used
teacher s: ``teacher.train.seed=<seed>``), when rows average over seeds and teachers alike. Debug runs (``debug=...``, ``trainer.fast_dev_run``, ``trainer.limit_*_batches``
a fraction below 1 or a count) are left out, and counted, unless ``--include-debug``. Each group is
one row: mean ± sample std (n − 1) over its successful runs; a figure fewer runs recorded shows
``(n=k)``. Accuracies, agreement and ECE are
shown in percent. When the runs pin published numbers, the row gets the published figure for its
label or method, ``Δ = our mean − published`` in percentage points and whether ``|Δ| ≤ tolerance``.
``--versus LABEL`` compares every row with the row ``LABEL`` of its block (a scratch run, a
control): the difference of the means, Welch's t with its degrees of freedom, p-value and 95 %
interval (scipy), a paired t-test over the seeds both rows ran, and the seeds per row needed to
resolve the difference (:mod:`kdx.report.stats`). ``--curves FILE.png`` draws the per-epoch
validation curves of every row from its runs' ``csv/metrics.csv`` (:mod:`kdx.report.curves`).
A successful run's record whose figures are not finite numbers in range is refused with a warning
naming the file and the field; a folder that cannot be listed is warned about.
Runs that did not succeed are counted (``failed``; ``missing`` for a record still ``running``),
never averaged, and listed under the table with their error. A run that finished with its student
at chance (``no_learning``) is averaged with the row's other runs — dropping it would hide a
method's collapse behind the seeds that learned — and counted in an ``at chance`` column (shown
when a row has one) and listed under the table. A folder whose ``metrics.json`` cannot
be read or is malformed is skipped with a warning naming it; a job folder of a sweep without any
``metrics.json`` (killed before it could write one) is listed too.

``--out DIR`` writes ``DIR/table.md`` (also printed), ``DIR/table.csv`` (the same numbers, full
precision) and ``DIR/table.png`` (one panel per dataset and teacher → student pair, successful rows
only; every seed a dot over the mean ± std). ``--out DIR/name.md`` picks the file name:
``DIR/name.{md,csv,png}``. The files are written to temporary names and replace the old ones only
when every one was written; with no row, nothing is written. ``kdx-table ... | head`` ends quietly (exit 141).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdx.record import FINISHED, NO_LEARNING, RecordError, RunRecord, read_record
from kdx.report import configs
from kdx.report.curves import plot_curves
from kdx.report.stats import compare

log = logging.getLogger("kdx.table")

NAME_KEYS = ("dataset", "teacher", "student")
# A row: the names above plus the row name (the run's label, or its method when it has none).
GROUP_KEYS = (*NAME_KEYS, "method")

# (metrics.json key, column label, scale, decimals). Scale 100 = shown in percent.
METRICS: tuple[tuple[str, str, float, int], ...] = (
    ("student/acc_best", "student best", 100.0, 2),
    ("student/acc", "student last", 100.0, 2),
    ("teacher/acc", "teacher", 100.0, 2),
    ("student/ppl_best", "student ppl", 1.0, 3),
    ("student/ppl", "student ppl", 1.0, 3),
    ("teacher/ppl", "teacher ppl", 1.0, 3),
    ("fidelity/agreement_best", "agreement", 100.0, 2),
    ("fidelity/agreement", "agreement", 100.0, 2),
    ("fidelity/kl_best", "KL(t‖s)", 1.0, 4),
    ("fidelity/kl", "KL(t‖s)", 1.0, 4),
    ("fidelity/kernel_gap_best", "kernel gap", 1.0, 4),
    ("fidelity/kernel_gap", "kernel gap", 1.0, 4),
    ("fidelity/cka_best", "CKA", 1.0, 4),
    ("fidelity/cka", "CKA", 1.0, 4),
    ("student/ece_best", "ECE student", 100.0, 2),
    ("student/ece", "ECE student", 100.0, 2),
    ("teacher/ece", "ECE teacher", 100.0, 2),
    ("time/fit_s", "fit s", 1.0, 1),
    ("throughput/train_samples_per_s", "samples/s", 1.0, 0),
    ("teacher_cache/bytes_per_token", "cache B/token", 1.0, 0),
)
PERCENT_KEYS = {key for key, _, scale, _ in METRICS if scale == 100.0}
ACCURACY_KEYS = ("student/acc_best", "student/acc", "teacher/acc")
# what --metric may also name for causal language models (perplexity and KL to the teacher: lower is better)
LM_METRICS = ("student/ppl_best", "student/ppl", "fidelity/kl_best", "fidelity/kl")
# Published blocks may name the student-alone baseline "scratch"; kdx calls that method "none".
PUBLISHED_ALIASES = {"none": ("none", "scratch", "baseline")}
# Methods in this order first (baseline, then KD), then alphabetically.
METHOD_ORDER = ("none", "kd")
# A record with this status is a run that has not finished (yet): counted as missing, not failed.
UNFINISHED = "running"
OUT_NAME = "table"
# the group key of a teacher checkpoint, added when runs of one row used different ones
SHA_KEY = "teacher/sha256"


@dataclass
class Run:
    path: Path  # the run folder
    status: str  # ok | no_learning | failed | diverged | ... | running
    keys: dict[str, str]  # GROUP_KEYS and the --by keys, as shown in the table
    method: str  # the registered method (the row name is the label when there is one)
    metrics: dict[str, float] = field(default_factory=dict)
    seed: int | str | None = None  # a string only in the record of a run that failed on its seed
    published: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    tags: tuple[str, ...] = ()
    config: dict[str, str] = field(default_factory=dict)  # the comparable config (kdx.report.configs)
    sha: str | None = None  # the teacher checkpoint's sha256
    debug: str | None = None  # why this is a debug run (RunRecord.debug_reason), or None
    record: RunRecord | None = None


@dataclass
class Found:
    """What a search found: the runs, the folders skipped, sweep job folders without a record, and
    the debug runs left out."""

    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    without_record: list[Path] = field(default_factory=list)
    debug: list[Run] = field(default_factory=list)


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
    """A --by key: a dotted path in the run's config (a list or mapping printed readably, e.g.
    ``[100,100]``), a group choice when the config holds the group's whole mapping
    (``--by optim`` → ``adam``), else a record field."""
    value = _select(record.config, key)
    choice = (record.choices or {}).get(key)
    if value is None or (isinstance(value, dict) and choice is not None):
        value = choice
    if value is None:
        value = record.get(key)
    if isinstance(value, (dict, list)):
        return configs.show(value)
    return "" if value is None else str(value)


def check_record(record: RunRecord, file: Path) -> None:
    """Refuse (:class:`~kdx.record.RecordError` naming the file and the field) a successful run's
    record whose figures are not finite numbers in range, or that names no method."""
    if not record.finished:
        return
    problems = record.figure_problems()
    if problems:
        key, what = problems[0]
        more = f" (and {', '.join(k for k, _ in problems[1:])})" if len(problems) > 1 else ""
        raise RecordError(f"field '{key}': {what}{more}; refusing the record", file)
    if not (record.method or record.label or (record.choices or {}).get("method")):
        raise RecordError("field 'method': missing from a successful run's record; refusing the record", file)


def read_run(metrics_path: Path, by: Sequence[str] = ()) -> Run:
    """One run from its metrics.json; ``OSError`` / :class:`~kdx.record.RecordError` (also for a
    record :func:`check_record` refuses)."""
    record = read_record(metrics_path)
    check_record(record, metrics_path)
    choices = record.choices or {}
    names = {k: str(record.get(k) or choices.get(k) or "?") for k in (*NAME_KEYS, "method")}
    method = names.pop("method")
    keys = {**names, "method": record.label or method}
    keys.update({k: _by_value(record, k) for k in by})
    metrics = {}
    if record.finished:  # ok, or no_learning: the figures it reached stand
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
        config=configs.comparable(record.config, metrics_path.parent.resolve()),
        sha=record.teacher_sha256,
        debug=record.debug_reason(),
        record=record,
    )


def _is_visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _walk(root: Path, found: Found) -> list[Path]:
    """Every metrics.json under ``root`` outside hidden folders; a folder that cannot be listed
    (permission denied, vanished) is warned about and recorded in ``found.skipped``."""

    def unreadable(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root
        reason = f"cannot read the folder ({type(err).__name__}: {err.strerror or err})"
        log.warning("skipping %s: %s", where, reason)
        found.skipped.append((where, reason))

    out = []
    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "metrics.json" in files or "metrics.json" in dirs:  # a folder so named: warned about
            out.append(Path(folder) / "metrics.json")
    return sorted(p for p in out if _is_visible(p, root))


def search(paths: Iterable[str | Path], by: Sequence[str] = (), include_debug: bool = True) -> Found:
    """Every run under ``paths`` (each metrics.json once), what was skipped, and what has none.
    ``include_debug=False`` moves debug runs (:meth:`~kdx.record.RunRecord.debug_reason`) from
    ``runs`` to ``debug``."""
    found = Found()
    seen: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"kdx-table: no such file or folder: {root}")
        if root.is_file():
            candidates = [root] if root.name == "metrics.json" else []
        else:
            candidates = _walk(root, found)
        for metrics_path in candidates:
            run_dir = metrics_path.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            try:
                run = read_run(metrics_path, by)
            except (OSError, RecordError) as err:
                reason = err.reason if isinstance(err, RecordError) else f"{type(err).__name__}: {err}"
                log.warning("skipping %s: unreadable metrics.json (%s)", metrics_path.parent, reason)
                found.skipped.append((metrics_path.parent, reason))
                continue
            (found.runs if include_debug or run.debug is None else found.debug).append(run)
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


VERSUS_FIGURES = (
    "versus_delta",
    "versus_t",
    "versus_df",
    "versus_p",
    "versus_ci_low",
    "versus_ci_high",
    "versus_paired_t",
    "versus_paired_p",
    "versus_seeds_needed",
)


def _by_seed(row: dict[str, Any], metric: str, tag: str) -> dict[Any, float]:
    """The row's values of ``metric`` keyed by seed, or (when seeds repeat) by a key no other row
    shares, so that no pair is formed."""
    pairs = row["_values"].get(metric, [])
    seeds = [seed for seed, _ in pairs]
    if None in seeds or len(set(seeds)) != len(seeds):
        return {(tag, i): v for i, (_, v) in enumerate(pairs)}
    return dict(pairs)


def add_versus(
    rows: Sequence[dict[str, Any]], reference: str, metric: str = "student/acc_best", by: Sequence[str] = ()
) -> None:
    """Each row's difference to the ``reference`` row (a method or run label) of its own (dataset,
    teacher, student, --by) block on ``metric``: Welch's t, its degrees of freedom, p-value and 95 %
    interval of the difference (scipy's ``ttest_ind(equal_var=False)``), the paired test
    (``ttest_rel``) over the seeds both rows ran when they share two or more, and the seeds per row
    that would resolve the observed difference (:mod:`kdx.report.stats`). Rows of a block without
    the reference get NaN."""
    block_keys = (*NAME_KEYS, *by)
    refs = {tuple(r[k] for k in block_keys): r for r in rows if r["method"] == reference}
    for row in rows:
        ref = refs.get(tuple(row[k] for k in block_keys))
        row["versus"], row["versus_metric"] = reference, metric
        row.update(dict.fromkeys(VERSUS_FIGURES, math.nan))
        row["versus_paired_n"] = 0
        if ref is None or ref is row:
            continue
        result = compare(_by_seed(row, metric, "row"), _by_seed(ref, metric, "ref"))
        row["versus_delta"] = row[f"{metric}_mean"] - ref[f"{metric}_mean"]
        row["versus_t"], row["versus_df"] = result.t, result.df
        row["versus_p"], row["versus_ci_low"], row["versus_ci_high"] = result.p, result.ci_low, result.ci_high
        row["versus_paired_t"], row["versus_paired_p"] = result.paired_t, result.paired_p
        row["versus_paired_n"] = result.paired_n
        row["versus_seeds_needed"] = result.seeds_needed


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


def differing_keys(runs: Sequence[Run], by: Sequence[str] = ()) -> list[str]:
    """The config keys whose values differ between runs of one (dataset, teacher, student, row
    name, ``by``) group: what a table keyed by those alone would merge."""
    keys = (*GROUP_KEYS, *by)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(tuple(run.keys.get(k, "") for k in keys), []).append(i)
    return configs.differing([r.config for r in runs], groups.values())


def split_keys(runs: Sequence[Run]) -> list[str]:
    """The keys that give every distinct config a row of its own: :func:`differing_keys`. Each
    run's ``keys`` gets their values (``–`` where its config lacks the key)."""
    keys = differing_keys(runs)
    for run in runs:
        run.keys.update({k: run.config.get(k, configs.ABSENT) for k in keys})
    return keys


def _teacher_per_seed(runs: Sequence[Run]) -> bool:
    """Whether every seed has one teacher checkpoint per (dataset, teacher): each seed distils from
    its own teacher (``teacher.train.seed=<seed>``), so a row's mean covers the teachers' variation
    too and rows compared seed by seed share their teacher."""
    shas: dict[tuple[Any, ...], set[str]] = {}
    for run in runs:
        if run.sha:
            shas.setdefault((run.keys["dataset"], run.keys["teacher"], run.seed), set()).add(run.sha)
    return all(len(s) == 1 for s in shas.values())


def _teacher_split(runs: Sequence[Run], group_keys: Sequence[str]) -> bool:
    """Give runs their teacher checkpoint as a key when some group holds runs of different ones
    (``teacher/sha256``): runs of different teachers never share a row, unless the teacher is a
    function of the seed (:func:`_teacher_per_seed`). True when it did."""
    shas: dict[tuple[str, ...], set[str]] = {}
    for run in runs:
        if run.sha:
            shas.setdefault(tuple(run.keys[k] for k in group_keys), set()).add(run.sha)
    if not any(len(s) > 1 for s in shas.values()):
        return False
    if _teacher_per_seed(runs):
        log.info("each seed distilled from its own teacher checkpoint: rows average over seeds and teachers")
        return False
    for run in runs:
        run.keys[SHA_KEY] = run.sha[:12] if run.sha else ""
    return True


def aggregate(runs: Sequence[Run], by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One dict per group: keys, counts, ``<metric>_mean/_std/_n`` (percent where shown so),
    the published comparison. Runs of different teacher checkpoints never share a row (a
    ``teacher/sha256`` key is added to ``by`` when they would); a row whose runs' configs differ
    in keys ``by`` does not name is warned about."""
    group_keys: tuple[str, ...] = (*GROUP_KEYS, *by)
    if _teacher_split(runs, group_keys):
        group_keys = (*group_keys, SHA_KEY)
        log.warning("runs used different teacher checkpoints (teacher/sha256): each gets rows of its own")
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.keys[k] for k in group_keys), []).append(run)

    def order(key: tuple[str, ...]) -> tuple:
        methods = sorted({r.method for r in groups[key]}, key=_method_rank)
        return (*key[:3], _method_rank(methods[0]), key[3], *key[4:])

    rows = []
    for key in sorted(groups, key=order):
        members = groups[key]
        ok = [r for r in members if r.status in FINISHED]  # a collapse (no_learning) is averaged in
        methods = sorted({r.method for r in members}, key=_method_rank)
        row: dict[str, Any] = dict(zip(group_keys, key))
        row["base_method"] = " ".join(methods)
        row["n"] = len(ok)
        row["failed"] = sum(r.status not in (*FINISHED, UNFINISHED) for r in members)
        row["no_learning"] = sum(r.status == NO_LEARNING for r in members)
        row["missing"] = sum(r.status == UNFINISHED for r in members)
        row["seeds"] = " ".join(str(s) for s in sorted({r.seed for r in ok if r.seed is not None}))
        seeds = [r.seed for r in ok]
        mixed = configs.differing([r.config for r in members])
        if mixed:
            shown = ", ".join(mixed[:6]) + (" ..." if len(mixed) > 6 else "")
            log.warning(
                "row %s merges runs whose configs differ in %s: name them with --by, or leave --by out "
                "to split by every differing key",
                _group_name(key),
                shown,
            )
        elif len(seeds) != len(set(seeds)):
            log.warning(
                "group %s holds several runs with the same seed: are different configs mixed? "
                "split them with --by (e.g. --by experiment)",
                _group_name(key),
            )
        row["_values"] = {}
        for metric, _, scale, _ in METRICS:
            pairs = [(r.seed, r.metrics[metric] * scale) for r in ok if metric in r.metrics]
            mean, std, n = _mean_std([v for _, v in pairs])
            row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_n"] = mean, std, n
            row["_values"][metric] = pairs
        row["_runs"] = [r.path for r in ok]
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


def _cell(row: dict[str, Any], key: str, decimals: int) -> str:
    """mean ± std of ``key``, with ``(n=k)`` when fewer of the row's runs recorded it than it has."""
    text = _fmt(row[f"{key}_mean"], row[f"{key}_std"], decimals)
    n = row[f"{key}_n"]
    return text if n in (0, row["n"]) else f"{text} (n={n})"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _seeds(value: float) -> str:
    if value is None or math.isnan(value):
        return ""
    if math.isinf(value):
        return "∞ (Δ = 0)"
    return f">{int(value) - 1}" if value > 1000 else str(int(value))


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
    # best-checkpoint figures present: each fidelity column says which checkpoint it was measured on
    best_pairs = {k for k, *_ in others if k.endswith("_best")}
    paired = {k.removesuffix("_best") for k in best_pairs}
    others = [
        (
            k,
            f"{label} ({'best' if k in best_pairs else 'last'})"
            if k.removesuffix("_best") in paired
            else label,
            s,
            d,
        )
        for k, label, s, d in others
    ]
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
        header += [
            f"Δ vs {versus}",
            "Welch t (df)",
            "p",
            "95 % CI of Δ",
            "paired p (seeds)",
            "seeds to resolve",
        ]
    has_chance = any(r["no_learning"] for r in rows)
    header += (["at chance"] if has_chance else []) + ["failed"] + (["missing"] if has_missing else [])
    body = []
    for r in rows:
        cells = [*keys(r), str(r["n"])]
        cells += [_cell(r, key, dec) for key, _, _, dec in accuracy]
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
                _p(r["versus_p"]),
                ""
                if math.isnan(r["versus_ci_low"])
                else f"[{r['versus_ci_low']:+.2f}, {r['versus_ci_high']:+.2f}]",
                ""
                if math.isnan(r["versus_paired_p"])
                else f"{_p(r['versus_paired_p'])} ({r['versus_paired_n']})",
                _seeds(r["versus_seeds_needed"]),
            ]
        cells += [str(r["no_learning"])] if has_chance else []
        cells += [str(r["failed"])] + ([str(r["missing"])] if has_missing else [])
        body.append(cells)
    lines = _md_table(header, body)
    if others:
        other_body = [[*keys(r), *(_cell(r, key, dec) for key, _, _, dec in others)] for r in rows]
        lines += ["", *_md_table([*key_header, *(label for _, label, _, _ in others)], other_body)]
    notes = []
    if rows:
        notes.append(
            "Accuracies, agreement and ECE in % (×100); mean ± sample std over seeds (n = successful "
            "runs); student best = test accuracy of the best-validation epoch, last = of the last epoch."
        )
    if has_chance:
        notes.append(
            "at chance: runs whose student's best validation accuracy was not significantly above the "
            "majority class (status no_learning); their figures are in the row's mean and n."
        )
    if any(r[f"{key}_n"] not in (0, r["n"]) for r in rows for key, *_ in METRICS):
        notes.append(
            "(n=k) after a figure: only k of the row's n runs recorded it; the mean is over those k."
        )
    if best_pairs:
        notes.append(
            "(best) = measured on the checkpoint student best comes from (the monitor's best validation "
            "epoch); (last) = on the last epoch, like student last."
        )
    if versus:
        notes.append(
            f"Δ vs {versus} = this row's mean − the {versus} row's mean of the same block on "
            f"{versus_metric}, in points; Welch t (df) = that difference over its standard error from the "
            "two rows' std and n, p its two-sided p-value and 95 % CI the interval of Δ (scipy "
            "ttest_ind, equal_var=False); paired p = ttest_rel over the seeds both rows ran (their number "
            "in brackets), when they share two or more; seeds to resolve = seeds per row at which a "
            "two-sided t-test (α 0.05) would find the observed Δ with 80 % power, given the rows' std "
            "(noncentral t)."
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
        parts.append("Failed, unfinished or at-chance (no_learning) runs:\n\n" + "\n".join(lines))
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

    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
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
    labels = [" ".join([m["method"], *(f"{k.rsplit('.', 1)[-1]}={m[k]}" for k in by)]) for m in members]
    means = [m[f"{metric}_mean"] for m in members]
    stds = [0.0 if math.isnan(m[f"{metric}_std"]) else m[f"{metric}_std"] for m in members]
    xs = list(range(len(members)))
    # every seed's value, spread a little sideways, under the mean ± std
    seeds = [
        (x - 0.08 + 0.05 * ((i % 5) - 2) / 2, v)
        for x, m in zip(xs, members)
        for i, (_, v) in enumerate(m.get("_values", {}).get(metric, []))
    ]
    points = ax.scatter(
        [p[0] for p in seeds], [p[1] for p in seeds], s=12, color="tab:blue", alpha=0.45, zorder=2
    )
    bars = ax.errorbar(
        [x - 0.08 for x in xs], means, yerr=stds, fmt="o", capsize=4, color="tab:blue", zorder=3
    )
    legend["ours (mean ± std)"] = (bars, points) if seeds else bars
    pub = [(x + 0.08, m["published"]) for x, m in zip(xs, members) if not math.isnan(m["published"])]
    if pub:
        legend["published"] = ax.scatter(
            [p[0] for p in pub], [p[1] for p in pub], marker="D", color="black", zorder=3
        )
    # the axis fits the students (seeds, mean ± std, published); the teacher line is drawn when it
    # falls inside, else named at the edge it lies beyond
    finite = [v + sign * e for v, e in zip(means, stds) for sign in (-1, 1)]
    finite += [p[1] for p in pub] + [p[1] for p in seeds]
    low, high = min(finite), max(finite)
    pad = max(0.5, 0.1 * (high - low))
    ax.set_ylim(low - pad, high + pad)
    teacher_acc = [m["teacher/acc_mean"] for m in members if not math.isnan(m["teacher/acc_mean"])]
    if teacher_acc:
        from matplotlib.lines import Line2D

        level = sum(teacher_acc) / len(teacher_acc)
        style = {"color": "tab:red", "linestyle": "--", "linewidth": 1}
        if low - pad <= level <= high + pad:
            ax.axhline(level, **style)
        else:
            above = level > high + pad
            ax.annotate(
                f"teacher {level:.2f} {'↑' if above else '↓'}",
                xy=(0.99, 0.97 if above else 0.03),
                xycoords="axes fraction",
                ha="right",
                va="top" if above else "bottom",
                fontsize=8,
                color="tab:red",
            )
        legend["teacher (ours)"] = Line2D([], [], **style)
    ax.set_xlim(-0.6, len(members) - 0.4)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%) · dots: seeds", fontsize=8)
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
    *,
    split: bool = False,
    include_debug: bool = True,
    curves: str | Path | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Read, aggregate and (when ``out`` is given and there are rows) write the files of
    ``output_files(out)``, each to a temporary file first, replacing the old ones only when every
    one was written; ``versus``: a method or run label every row is compared with
    (:func:`add_versus`). ``split`` (what ``kdx-table`` does without ``--by``): rows are also keyed
    by every config value that differs between runs of one row (:func:`split_keys`).
    ``include_debug=False`` leaves debug runs out (``found.debug``; the markdown says how many).
    ``curves``: a PNG path for the per-epoch curves of every row's runs (:mod:`kdx.report.curves`)."""
    by = [k for k in dict.fromkeys(by) if k not in GROUP_KEYS]  # the names are keys already
    found = search(paths, by, include_debug=include_debug)
    if found.debug:
        reasons = sorted({r.debug or "" for r in found.debug})
        log.warning(
            "left out %d debug run(s) (%s); --include-debug puts them in the table",
            len(found.debug),
            ", ".join(reasons[:4]) + (" ..." if len(reasons) > 4 else ""),
        )
    if split and not by:
        by = split_keys(found.runs)
    rows = aggregate(found.runs, by)
    if versus:
        if not any(r["method"] == versus for r in rows):
            labels = sorted({r["method"] for r in rows})
            raise ValueError(
                f"--versus {versus}: no row has that method or label; the rows are {', '.join(labels)}"
            )
        add_versus(rows, versus, metric, by)
    markdown = to_markdown(rows, by) + _problems_markdown(found)
    if found.debug:
        markdown += (
            f"\n{len(found.debug)} debug run(s) left out (debug=..., trainer.fast_dev_run, "
            "trainer.limit_*_batches); --include-debug shows them.\n"
        )
    if out is not None and rows:
        files = output_files(out)
        writers = {
            "md": lambda p: p.write_text(markdown, encoding="utf-8"),
            "csv": lambda p: write_csv(rows, p),
        }
        if figure:
            writers["png"] = lambda p: plot(rows, p, metric, by)
        _write_all({files[ext]: write for ext, write in writers.items()})
    if curves is not None and rows:
        write_curves(rows, curves, by)
    return rows, markdown


def write_curves(rows: Sequence[dict[str, Any]], path: str | Path, by: Sequence[str] = ()) -> dict:
    """The per-epoch curves of every row's successful runs, mean ± std band per row, as the PNG
    ``path`` (written whole or not at all); returns what was drawn, ``{CSV column: {row label: {run
    folder: [(epoch, value), ...]}}}`` (:func:`kdx.report.curves.plot_curves`)."""
    groups = {_row_label(r, by): r["_runs"] for r in rows if r["_runs"]}
    drawn: dict = {}
    _write_all({Path(path): lambda p: drawn.update(plot_curves(groups, p))})
    return drawn


def _row_label(row: dict[str, Any], by: Sequence[str]) -> str:
    """``kd hidden=[32]`` (the row name and its --by / differing values), with the pair when the
    rows span several."""
    extra = " ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in by if row.get(k) not in (None, ""))
    return f"{row['dataset']} {row['teacher']}→{row['student']} {row['method']}" + (
        f" {extra}" if extra else ""
    )


def _write_all(writers: dict[Path, Any]) -> None:
    """Write every file through ``writers[path](temporary path)`` beside its target, then move them
    all into place; on any error no target is touched and the temporaries are removed."""
    done: dict[Path, Path] = {}
    try:
        for target, write in writers.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
            os.close(fd)
            done[target] = Path(name)
            write(Path(name))
    except BaseException:
        for tmp in done.values():
            tmp.unlink(missing_ok=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    for target, tmp in done.items():
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, target)


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
        help="grouping key: a config group (experiment, optim...) or a dotted config path "
        "(method.temperature, student.model.hidden); repeatable. Without --by, rows are keyed by every "
        "config value that differs between a row's runs",
    )
    parser.add_argument(
        "--metric",
        default="student/acc_best",
        choices=[*sorted(k for k in PERCENT_KEYS if k.startswith("student/acc")), *LM_METRICS],
        help="the figure drawn, and what --versus compares (default: student/acc_best; language models: "
        "student/ppl_best, student/ppl, fidelity/kl)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--include-debug",
        action="store_true",
        help="keep debug runs (debug=..., trainer.fast_dev_run, trainer.limit_*_batches); left out by default",
    )
    parser.add_argument(
        "--curves",
        default=None,
        metavar="OUT.png",
        help="also draw validation accuracy / loss / fidelity per epoch (mean ± std over each row's seeds) "
        "from every run's csv/metrics.csv",
    )
    parser.add_argument(
        "--versus",
        default=None,
        metavar="LABEL",
        help="a method or run label (e.g. none, or a control's label): every row of the same block gets "
        "its difference to it on --metric, with Welch's t",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="kdx-table: %(message)s")
    with quiet_broken_pipe():
        try:
            rows, markdown = make_table(
                args.paths,
                args.out,
                args.by,
                args.metric,
                figure=not args.no_plot,
                versus=args.versus,
                split=not args.by,
                include_debug=args.include_debug,
                curves=args.curves,
            )
        except (FileNotFoundError, ValueError) as err:
            print(err, file=sys.stderr)
            return 2
        if not rows:
            kept = f"; {args.out} left as it was" if args.out else ""
            print(f"kdx-table: no readable metrics.json under {' '.join(args.paths)}{kept}", file=sys.stderr)
            problems = "\n".join(line for line in markdown.splitlines() if not line.startswith("|")).strip()
            if problems:
                print(problems, file=sys.stderr)
            return 1
        print(markdown)
        if args.out or args.curves:
            written = []
            if args.out:
                files = output_files(args.out)
                written = [files["md"], files["csv"]] + ([] if args.no_plot else [files["png"]])
            written += [Path(args.curves)] if args.curves else []
            print("wrote " + ", ".join(map(str, written)))
        sys.stdout.flush()
    return 0


class quiet_broken_pipe:
    """``kdx-table ... | head``: when the reader goes away, stop writing without a traceback
    (stdout is pointed at /dev/null so the interpreter's final flush stays quiet too)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if kind is not None and issubclass(kind, BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            raise SystemExit(141)  # 128 + SIGPIPE, as a shell reports a reader that hung up
        return False


if __name__ == "__main__":
    sys.exit(main())
