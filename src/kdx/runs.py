"""``kdx-runs``: list the runs under folders, with what differs between them; filter, sort, pick the best.

    kdx-runs logs/train                               # every run: differing config, seed, status, figures
    kdx-runs logs/train --where method=kd --sort -student/acc_best
    kdx-runs logs/train/multiruns/<time> --best       # the best run by the monitor on validation
    kdx-runs logs/train --where 'student.model.hidden=[32]' --paths   # their folders, one a line

Reads each run's ``metrics.json`` only (through :mod:`kdx.record`), with kdx-table's search: hidden
folders are skipped, unreadable folders and malformed or out-of-range records are warned about, and
debug runs (``debug=...``, ``trainer.fast_dev_run``, ``trainer.limit_*_batches``) are left out unless
``--include-debug``. The columns: the run folder, status, seed, the row name (label or method), every
config value that differs between runs of the same method (lists printed ``[100,100]``), the
monitor's best validation value and the headline test figures (accuracies and agreement in %).

``--where KEY=VALUE`` (repeatable, all must hold) matches a dotted config key (``method.alpha``,
``student.model.hidden``), a group choice (``experiment``) or a record key (``method``, ``status``,
``seed``, ``student/acc_best``), comparing the value as shown (``[32]``, ``0.9``, ``null``).
``--sort KEY`` orders by the same kinds of key (``--sort=-KEY``: descending; numbers as numbers).
``--best`` keeps the successful run with the best ``monitor/best`` (the validation figure the
checkpoint callback monitored, in its mode); it refuses a monitor on test figures, and runs that
monitored different things.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdx.report import configs
from kdx.table import GROUP_KEYS, Run, quiet_broken_pipe, search

log = logging.getLogger("kdx.table")

# (metrics.json key, column, scale, decimals)
HEADLINE = (
    ("student/acc_best", "best %", 100.0, 2),
    ("student/acc", "last %", 100.0, 2),
    ("fidelity/agreement_best", "agree best %", 100.0, 2),
    ("fidelity/agreement", "agree last %", 100.0, 2),
)


def value_of(run: Run, key: str) -> Any:
    """``key`` of a run: ``method`` is the row name (label, else method); else its config value
    (shown), a group choice (for a group's whole mapping), a record key, the mapping itself."""
    if key in run.config:
        return run.config[key]
    record = run.record
    if record is None:
        return None
    if key in ("method", "name"):  # the row name: the label, else the method
        return record.name
    found, value = configs.lookup(record.config, key)
    if found and not isinstance(value, dict):
        return configs.show(value)
    choice = (record.choices or {}).get(key)
    if choice is not None:
        return choice
    if record.get(key) is not None:
        return record.get(key)
    return configs.show(value) if found else None


def _matches(run: Run, key: str, wanted: str) -> bool:
    value = value_of(run, key)
    if value is None:
        return wanted in ("null", "None", "")
    if configs.show(value) == wanted or str(value) == wanted:
        return True
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return False


def _sort_key(run: Run, key: str) -> tuple:
    value = value_of(run, key)
    if value is None:
        return (2, 0.0, "")
    try:
        number = float(value)
        if math.isfinite(number):
            return (0, number, "")
    except (TypeError, ValueError):
        pass
    return (1, 0.0, str(value))


def best_run(runs: Sequence[Run]) -> Run:
    """The successful run with the best ``monitor/best`` in its ``monitor_mode``; ``ValueError`` when
    none has one, when the monitor is a test figure, or when runs monitored different figures."""
    scored = [r for r in runs if r.status == "ok" and r.record and r.record.monitor_best is not None]
    if not scored:
        raise ValueError("--best: no successful run records a monitor (monitor/best)")
    monitors = {(r.record.monitor, r.record.monitor_mode or "max") for r in scored}
    if len(monitors) > 1:
        raise ValueError(
            "--best: the runs monitored different figures ("
            + ", ".join(f"{m} ({mode})" for m, mode in sorted(monitors, key=str))
            + "); narrow them with --where"
        )
    ((monitor, mode),) = monitors
    if "test" in str(monitor).split("/")[0]:
        raise ValueError(f"--best: the monitor {monitor} is a test figure; kdx picks runs on validation only")
    if mode not in ("max", "min"):
        raise ValueError(f"--best: unknown monitor_mode {mode!r}")
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r.record.monitor_best)


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _figure(run: Run, key: str, scale: float, decimals: int) -> str:
    value = run.record.get(key) if run.record else None
    return "–" if value is None else f"{value * scale:.{decimals}f}"


def table(runs: Sequence[Run], keys: Sequence[str]) -> list[list[str]]:
    """Header and one row per run: folder, status, seed, name, ``keys``, monitor, headline figures."""
    headline = [h for h in HEADLINE if any(r.record and r.record.get(h[0]) is not None for r in runs)]
    monitors = {r.record.monitor for r in runs if r.record and r.record.monitor}
    monitor = next(iter(monitors)) if len(monitors) == 1 else "monitor"
    header = ["run", "status", "seed", "method", *keys, monitor, *(h[1] for h in headline)]
    body = []
    for r in runs:
        rec = r.record
        mon = "–"
        if rec and rec.monitor_best is not None:
            mon = f"{rec.monitor_best:.4g}" if len(monitors) == 1 else f"{rec.monitor}={rec.monitor_best:.4g}"
        body.append(
            [
                _shown_path(r.path),
                r.status,
                str(r.seed),
                r.keys["method"],
                *(r.config.get(k, configs.ABSENT) for k in keys),
                mon,
                *(_figure(r, key, scale, dec) for key, _, scale, dec in headline),
            ]
        )
    return [header, *body]


def render(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def list_runs(
    paths: Sequence[str | Path],
    where: Sequence[str] = (),
    sort: str | None = None,
    best: bool = False,
    include_debug: bool = False,
) -> tuple[list[Run], list[str]]:
    """The runs under ``paths`` after ``where`` (``KEY=VALUE``), ordered by ``sort`` (``-KEY``:
    descending), or only the best by validation (``best``); and the config keys that differ between
    runs of one (dataset, teacher, student, method) group: the columns kdx-runs shows."""
    found = search(paths, include_debug=include_debug)
    if found.debug:
        log.warning("left out %d debug run(s); --include-debug lists them too", len(found.debug))
    runs = found.runs
    for condition in where:
        key, sep, wanted = condition.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {condition}: write KEY=VALUE (e.g. method=kd)")
        runs = [r for r in runs if _matches(r, key.strip(), wanted.strip())]
    keys = configs.differing(
        [r.config for r in runs],
        _groups(runs),
    )
    if best and runs:
        runs = [best_run(runs)]
    elif sort:
        descending = sort.startswith("-")
        key = sort.lstrip("-")
        present = [r for r in runs if value_of(r, key) is not None]
        absent = [r for r in runs if value_of(r, key) is None]
        runs = sorted(present, key=lambda r: _sort_key(r, key), reverse=descending) + absent
    else:
        runs = sorted(runs, key=lambda r: str(r.path))
    return runs, keys


def _groups(runs: Sequence[Run]) -> list[list[int]]:
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(tuple(r.keys[k] for k in GROUP_KEYS), []).append(i)
    return list(groups.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdx-runs",
        description="List the runs under run / multirun folders (searched recursively for metrics.json): "
        "the config values that differ between them, seed, status, the monitor's best validation value "
        "and the headline test figures.",
    )
    parser.add_argument("paths", nargs="+", help="run folders, multirun folders, or metrics.json files")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs whose config key / group choice / record key has this value (repeatable)",
    )
    parser.add_argument(
        "--sort", default=None, metavar="KEY", help="order by KEY; --sort=-KEY: descending (write the = sign)"
    )
    parser.add_argument(
        "--best", action="store_true", help="only the best successful run by its monitor on validation"
    )
    parser.add_argument("--paths", action="store_true", dest="only_paths", help="print the run folders only")
    parser.add_argument("--include-debug", action="store_true", help="list debug runs too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="kdx-runs: %(message)s")
    with quiet_broken_pipe():
        try:
            runs, keys = list_runs(args.paths, args.where, args.sort, args.best, args.include_debug)
        except (FileNotFoundError, ValueError) as err:
            print(str(err).replace("kdx-table:", "kdx-runs:"), file=sys.stderr)
            return 2
        if not runs:
            print(f"kdx-runs: no run under {' '.join(args.paths)} matches", file=sys.stderr)
            return 1
        if args.only_paths:
            print("\n".join(str(r.path) for r in runs))
        else:
            print(render(table(runs, keys)))
            if args.best:
                rec = runs[0].record
                print(f"best by {rec.monitor} ({rec.monitor_mode}) on validation: {runs[0].path}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
