"""kdx's Lightning callbacks, and the one seam through which a callback adds figures to metrics.json.

A callback that has headline figures of its own subclasses :class:`ReportsMetrics` and returns them
from :meth:`ReportsMetrics.report`; ``kdx-train`` merges every such report into ``metrics.json``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class ReportsMetrics:
    """Mixin for callbacks whose figures belong in ``metrics.json``."""

    def report(self) -> dict[str, Any]:
        raise NotImplementedError


class TrainingThroughput(L.Callback, ReportsMetrics):
    """Training samples per second over the training batches of each epoch (the first epoch is warm-up).

    Named apart from Lightning's own ``ThroughputMonitor``; times with the host clock only at batch
    boundaries (no device sync), so on a GPU it measures what the loop sustains.
    """

    def __init__(self):
        self.samples = 0
        self.seconds = 0.0
        self._epoch_start: float | None = None
        self._epoch_samples = 0
        self._epochs = 0
        self._last = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start, self._epoch_samples = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._epoch_start is None:
            self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._epoch_samples += batch[1].shape[0]  # y: x may be a mapping (text)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._epoch_start is None:
            return
        self._epochs += 1
        if self._epochs == 2:  # drop the warm-up epoch once a second one exists
            self.samples, self.seconds = 0, 0.0
        self.samples += self._epoch_samples * trainer.world_size
        self.seconds += self._last - self._epoch_start

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None

    def report(self) -> dict[str, Any]:
        return {"throughput/train_samples_per_s": self.samples_per_s}
