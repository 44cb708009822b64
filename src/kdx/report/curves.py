"""Training curves: per-epoch figures from each run's ``csv/metrics.csv`` (Lightning's CSVLogger),
mean ± std over the seeds of a row, one panel per figure.

The CSV logger writes one row per logging call, so an epoch's validation figures, its training
loss and the step rows sit on different lines with empty cells between; :func:`read_curves` merges
them into one row per epoch (the first value each column has in that epoch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("kdx.table")

# (CSV column, panel title), drawn when any run logged it
CURVES: tuple[tuple[str, str], ...] = (
    ("val/student/acc", "validation accuracy"),
    ("val/loss", "validation loss"),
    ("train/loss_epoch", "training loss"),
    ("val/fidelity/agreement", "validation agreement"),
    ("val/fidelity/kl", "validation KL(t‖s)"),
)

Series = list[tuple[int, float]]  # (epoch, value)


def csv_file(run_dir: Path) -> Path | None:
    """The run's CSV log: ``csv/metrics.csv``, else the newest ``csv/version_*/metrics.csv``."""
    direct = run_dir / "csv" / "metrics.csv"
    if direct.is_file():
        return direct
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    return versions[-1] if versions else None


def read_curves(path: Path, columns: Sequence[str] = tuple(c for c, _ in CURVES)) -> dict[str, Series]:
    """``{column: [(epoch, value), ...]}`` from one CSV log, merged to one value per epoch."""
    import pandas as pd

    frame = pd.read_csv(path)
    if "epoch" not in frame:
        return {}
    frame = frame[frame["epoch"].notna()]
    present = [c for c in columns if c in frame]
    if not present:
        return {}
    merged = frame.groupby(frame["epoch"].astype(int))[present].first()
    out: dict[str, Series] = {}
    for column in present:
        values = merged[column].dropna()
        if len(values):
            out[column] = [(int(e), float(v)) for e, v in values.items()]
    return out


def _mean_band(series: Sequence[Series]) -> tuple[list[int], list[float], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for one in series:
        for epoch, value in one:
            by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    means, stds = [], []
    for e in epochs:
        vals = by_epoch[e]
        m = sum(vals) / len(vals)
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    return epochs, means, stds


def plot_curves(rows: Mapping[str, Sequence[Path]], out: Path) -> dict[str, dict[str, dict[Path, Series]]]:
    """Draw ``out`` (a PNG): for each figure of :data:`CURVES` that any run logged, one line per row
    (``rows``: row label → its run folders), the mean over its runs per epoch with a ± std band.
    Returns what was drawn: ``{column: {row label: {run folder: series}}}``. Runs without a CSV log
    are named in a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    drawn: dict[str, dict[str, dict[Path, Series]]] = {}
    without = []
    for label, run_dirs in rows.items():
        for run_dir in run_dirs:
            file = csv_file(run_dir)
            if file is None:
                without.append(run_dir)
                continue
            try:
                curves = read_curves(file)
            except (OSError, ValueError) as err:
                log.warning("skipping the curves of %s: %s", file, err)
                continue
            for column, series in curves.items():
                drawn.setdefault(column, {}).setdefault(label, {})[run_dir] = series
    if without:
        log.warning(
            "%d run(s) have no csv/metrics.csv (logger without csv?): %s",
            len(without),
            ", ".join(map(str, without)),
        )
    panels = [(c, title) for c, title in CURVES if c in drawn]
    if not panels:
        fig, ax = plt.subplots(figsize=(5.2, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "no run has a per-epoch CSV log", ha="center", va="center")
    else:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        labels = list(rows)
        for ax, (column, title) in zip(axes.flat, panels):
            for label, runs in drawn[column].items():
                color = colors[labels.index(label) % len(colors)]
                epochs, means, stds = _mean_band(list(runs.values()))
                ax.plot(
                    epochs, means, marker="o", markersize=3, color=color, label=f"{label} (n={len(runs)})"
                )
                ax.fill_between(
                    epochs,
                    [m - s for m, s in zip(means, stds)],
                    [m + s for m, s in zip(means, stds)],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(column, fontsize=8)
            ax.grid(alpha=0.3)
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8)
        fig.tight_layout(rect=(0.0, 0.1 + 0.05 * (len(names) // 4), 1.0, 1.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def series_of(drawn: Mapping[str, Mapping[str, Mapping[Path, Any]]]) -> set[Path]:
    """Every run folder whose CSV was drawn in some panel."""
    return {run for rows in drawn.values() for runs in rows.values() for run in runs}
