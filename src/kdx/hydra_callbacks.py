"""Hydra callbacks: what a person sees at the end of a multirun.

``MultirunReport`` prints one line per job (status, accuracy, run folder) and the sweep folder, and
makes the multirun exit non-zero — after every job ran — when any job failed, naming them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdx.record import RecordError, RunRecord, read_record


def _read(path: Path) -> RunRecord:
    try:
        return read_record(path)
    except (OSError, RecordError):
        return RunRecord(status="unreadable")


def _percent(value: Any) -> str:
    return f"{100 * value:6.2f} %" if isinstance(value, (int, float)) else "      —"


class MultirunReport(Callback):
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
        for path in jobs:
            record = _read(path)
            line = (
                f"  {path.parent.name:>4}  {record.status:<8} {record.name:<14} seed {record.seed!s:<4} "
                f"acc {_percent(record.student_acc)}  best {_percent(record.student_acc_best)}"
            )
            if not record.ok:
                failed.append(path.parent.name)
                line += f"  {record.error_type or ''}: {(record.error or '')[:120]}"
            lines.append(line)
        print("\n".join(lines), flush=True)
        if failed:
            print(
                f"kdx: error: {len(failed)} of {len(jobs)} jobs failed (job {', '.join(failed)}); "
                f"their metrics.json and logs in {sweep_dir} say why",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
