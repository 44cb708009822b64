"""Hydra callbacks: who owns a run folder, and what a person sees at the end of a multirun.

``RunFolderLock`` takes the run folder before Hydra writes anything into it: a second run on the same
folder refuses with one line (exit 2). ``MultirunReport`` prints one line per job (status, what
sets it apart from the other jobs, accuracy) and the sweep folder, and makes the multirun exit
non-zero — after every job ran — when any job failed, naming them; an interrupted sweep reports at
once, naming the jobs that finished, the one interrupted and those never run. An Optuna sweep ends
with its best trial.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdx import runlock
from kdx.record import RecordError, RunRecord, read_record

# the multirun's planned jobs (their overrides), known at its start; an interrupted job reports with it
_planned: dict[str, Any] = {}


def _read(path: Path) -> RunRecord:
    try:
        return read_record(path)
    except (OSError, RecordError):
        return RunRecord(status="unreadable")


def _percent(value: Any) -> str:
    return f"{100 * value:6.2f} %" if isinstance(value, (int, float)) else "      —"


def _job_overrides(job_dir: Path) -> dict[str, str]:
    try:
        items = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    except (OSError, ValueError):
        return {}
    return dict(str(o).lstrip("+~").partition("=")[::2] for o in items)


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1] if "@" not in key else key


def job_names(job_dirs: list[Path]) -> dict[Path, str]:
    """Each job named by what differs between the jobs (``method=kd temperature=2 seed=0``)."""
    overrides = {d: _job_overrides(d) for d in job_dirs}
    keys = sorted({k for o in overrides.values() for k in o})
    differ = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    return {d: " ".join(f"{_short(k)}={o[k]}" for k in differ if k in o) or "—" for d, o in overrides.items()}


def _plan(config: DictConfig) -> list[list[str]] | int | None:
    """The jobs a sweep will launch: their overrides (basic sweeper), or their count (Optuna)."""
    sweeper = str(config.hydra.sweeper.get("_target_", ""))
    if "optuna" in sweeper.lower():
        n = config.hydra.sweeper.get("n_trials")
        return int(n) if n is not None else None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # Hydra's own job split
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # noqa: BLE001 - the plan only sharpens the report of an interrupted sweep
        return None


def report_interrupted_sweep(signum: int) -> None:
    """Called by the interrupted job: the sweep stops here, so its report is written now."""
    import signal

    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    current = int(hydra_cfg.job.num)
    done = sorted(
        (p.parent for p in sweep_dir.glob("*/metrics.json") if p.parent.name.isdigit()),
        key=lambda p: int(p.name),
    )
    plan = _planned.get(str(sweep_dir))
    total = len(plan) if isinstance(plan, list) else plan if isinstance(plan, int) else None
    never = list(range(current + 1, total)) if total is not None else []
    lines = [
        f"kdx multirun: interrupted by {signal.Signals(signum).name} during job {current} in {sweep_dir}"
    ]
    names = job_names(done)
    for d in done:
        record = _read(d / "metrics.json")
        lines.append(f"  {d.name:>4}  {record.status:<11} {names[d]}")
    if isinstance(plan, list):
        for n in never:
            lines.append(f"  {n:>4}  {'not run':<11} {' '.join(plan[n])}")
    elif total is None:
        lines.append("  (later jobs: not run)")
    finished = [d.name for d in done if _read(d / "metrics.json").status != "interrupted"]
    lines.append(
        f"finished: {', '.join(finished) or 'none'}; interrupted: {current}; "
        f"not run: {', '.join(map(str, never)) if total is not None else 'the rest'}"
    )
    print("\n".join(lines), file=sys.stderr, flush=True)


def _optuna_best(sweep_dir: Path) -> str | None:
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return None
    try:
        results = OmegaConf.load(path)
        params = " ".join(f"{k}={v}" for k, v in (results.get("best_params") or {}).items())
        return f"optuna best trial: {results.get('best_value')} with {params}"
    except Exception:  # noqa: BLE001 - the line is a courtesy; the file is Optuna's
        return None


class RunFolderLock(Callback):
    """A single run owns its folder from before Hydra writes into it (``.hydra/``, the log)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if any(os.environ.get(v, "0") != "0" for v in ("LOCAL_RANK", "NODE_RANK", "RANK")):
            return  # a DDP worker Lightning launched into its rank 0's folder, which holds it
        folder = Path(str(config.hydra.run.dir))
        try:
            runlock.acquire(folder)
        except runlock.FolderInUse as err:
            print(f"kdx: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)


class MultirunReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _planned[str(Path(str(config.hydra.sweep.dir)))] = _plan(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted(
            (p for p in sweep_dir.glob("*/metrics.json")),
            key=lambda p: (len(p.parent.name), p.parent.name),
        )
        if not jobs:
            return
        failed: list[str] = []
        lines = [f"kdx multirun: {len(jobs)} jobs in {sweep_dir}"]
        # a job without overrides that set it apart (a resumed or hand-made folder) is named by its seed
        seeds = {p.parent: _read(p).seed for p in jobs}
        names = {
            d: name if name != "—" or seeds[d] is None else f"seed {seeds[d]}"
            for d, name in job_names([p.parent for p in jobs]).items()
        }
        width = max(len(n) for n in names.values())
        for path in jobs:
            record = _read(path)
            line = (
                f"  {path.parent.name:>4}  {record.status:<8} {record.name:<6} {names[path.parent]:<{width}} "
                f"acc {_percent(record.student_acc)}  best {_percent(record.student_acc_best)}"
            )
            if not record.ok:
                failed.append(path.parent.name)
                if record.error_type or record.error:
                    line += f"  {record.error_type or ''}: {(record.error or '')[:120]}"
            lines.append(line)
        best = _optuna_best(sweep_dir)
        if best:
            lines.append(best)
        print("\n".join(lines), flush=True)
        if failed:
            print(
                f"kdx: error: {len(failed)} of {len(jobs)} jobs failed (job {', '.join(failed)}); "
                f"their metrics.json and logs in {sweep_dir} say why",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
