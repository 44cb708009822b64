"""``kdx-train``: compose → build → fit → test → metrics.json.

    kdx-train                                   # MNIST-1D, CNN teacher (auto-trained, cached), MLP student, KD
    kdx-train method=none seed=1 trainer.max_epochs=10
    kdx-train -m method=none,kd seed=0,1,2      # six run folders, each with metrics.json

A user error (bad path, class-count mismatch, NaN loss...) is printed as one line and the process
exits with code 2; the run folder then holds a ``metrics.json`` with ``status: failed`` and the
reason, so a multirun goes on and ``kdx-table`` counts the failure.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

import kdx
import kdx.methods  # noqa: F401 - registers every method's schema before composition
from kdx.errors import KDXError
from kdx.module import DistillationModule, NonFiniteLossError
from kdx.teacher import check_teacher, provide_teacher
from kdx.utils import atomic_write_json

log = logging.getLogger("kdx")

# Noise that says nothing about a kdx run: the frozen teacher is in eval mode on purpose, and
# Lightning's advertisement and a deprecation inside Lightning itself.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda r: "litlogger" not in r.getMessage()
)
# conf/ ships inside the package as kdx.conf (pyproject.toml maps it), so wheel and editable installs
# find the same configs from any folder; users add theirs with --config-dir or hydra.searchpath.
CONFIG_DIR = "pkg://kdx.conf"


class Throughput(L.Callback):
    """Training samples per second over the training batches of each epoch (the first epoch is warm-up)."""

    def __init__(self):
        self.samples = 0
        self.seconds = 0.0
        self._epoch_start: float | None = None
        self._epoch_samples = 0
        self._epochs = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start, self._epoch_samples = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._epoch_start is None:
            self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._epoch_samples += batch[0].shape[0]
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
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _test_metrics(results: list[dict]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for r in results:
        merged.update({k.removeprefix("test/"): _float(v) for k, v in r.items()})
    return merged


def _versions() -> dict[str, str]:
    import lightning
    import timm
    import torchmetrics

    return {
        "kdx": kdx.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "timm": timm.__version__,
        "hydra": hydra.__version__,
    }


def build(cfg: DictConfig) -> tuple[DistillationModule, L.LightningDataModule, dict]:
    """Everything a run needs, checked for consistency, before any training."""
    datamodule: L.LightningDataModule = instantiate(cfg.dataset.datamodule)
    if int(datamodule.num_classes) != int(cfg.dataset.num_classes):
        raise KDXError(
            f"dataset={cfg.dataset.name}: the config says num_classes={cfg.dataset.num_classes} "
            f"but the data has {datamodule.num_classes}; fix dataset.num_classes"
        )
    method = instantiate(cfg.method)
    student = instantiate(cfg.student.model)
    student_classes = getattr(student, "num_classes", None)
    if student_classes is not None and int(student_classes) != int(cfg.dataset.num_classes):
        raise KDXError(
            f"student={cfg.student.name} has {student_classes} classes but dataset={cfg.dataset.name} "
            f"has {cfg.dataset.num_classes}; leave student.model.num_classes at ${{dataset.num_classes}}"
        )
    datamodule.prepare_data()
    datamodule.setup("fit")
    info: dict[str, Any] = {}
    teacher = None
    if method.needs_teacher or cfg.teacher.get("model") is not None:
        if method.needs_teacher and cfg.teacher.get("model") is None:
            raise KDXError(
                f"method={method.name} needs a teacher but teacher=none; pick one, e.g. teacher=cnn1d"
            )
        if method.trains_teacher and not method.uses_teacher_weights():
            teacher, info = instantiate(cfg.teacher.model), {"teacher/source": "random init"}
        else:
            teacher, info = provide_teacher(cfg, datamodule)
            info["teacher/val_acc"] = check_teacher(
                teacher, datamodule, cfg.teacher.min_acc, cfg.teacher.name
            )
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same student init whatever the teacher did
    student = instantiate(cfg.student.model)
    optim = cfg.optim
    module = DistillationModule(
        student=student,
        method=method,
        num_classes=cfg.dataset.num_classes,
        optimizer=instantiate(optim.optimizer),
        scheduler=instantiate(optim.scheduler) if optim.get("scheduler") else None,
        scheduler_interval=optim.get("interval", "epoch"),
        teacher=teacher,
        student_stages=cfg.student.get("stage_names"),
        teacher_stages=cfg.teacher.get("stage_names"),
    )
    return module, datamodule, info


def _instantiate_dict(node: DictConfig | None) -> list:
    return [instantiate(c) for c in (node or {}).values() if c is not None and "_target_" in c]


def run(cfg: DictConfig) -> dict[str, Any]:
    """One training run; returns the figures written to ``<output_dir>/metrics.json``."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    module, datamodule, teacher_info = build(cfg)
    throughput = Throughput()
    callbacks = [*_instantiate_dict(cfg.get("callbacks")), throughput]
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_s = time.perf_counter() - started

    metrics: dict[str, Any] = {}
    best_ckpt = next(
        (c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == cfg.monitor), None
    )
    if cfg.get("test", True):
        metrics.update(_test_metrics(trainer.test(module, datamodule=datamodule, verbose=False)))
        best_path = best_ckpt.best_model_path if best_ckpt else ""
        if best_path and Path(best_path).is_file():
            best = _test_metrics(
                trainer.test(
                    module, datamodule=datamodule, ckpt_path=best_path, verbose=False, weights_only=True
                )
            )
            metrics["student/acc_best"] = best["student/acc"]
            metrics["student/best_ckpt"] = best_path
        else:
            metrics["student/acc_best"] = metrics["student/acc"]
    best_val = best_ckpt.best_model_score if best_ckpt else None
    for callback in callbacks:  # callbacks with headline figures of their own (diagnostics)
        metrics.update(getattr(callback, "summary", dict)())
    metrics.update(
        {
            "status": "ok",
            "student/val_acc_best": None if best_val is None else _float(best_val),
            "time/fit_s": fit_s,
            "throughput/train_samples_per_s": throughput.samples_per_s,
            "epochs": trainer.current_epoch,
            "seed": int(cfg.seed),
            "method": module.method.name,
            "dataset": cfg.dataset.name,
            "teacher": cfg.teacher.name,
            "student": cfg.student.name,
            "teacher/sha256": teacher_info.get("teacher/sha256"),
            "versions": _versions(),
        }
    )
    metrics.update({k: v for k, v in teacher_info.items() if k not in metrics})
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "metrics.json", metrics)
    return metrics


SUMMARY_KEYS = (
    "student/acc",
    "student/acc_best",
    "teacher/acc",
    "fidelity/kl",
    "fidelity/agreement",
    "fidelity/kernel_gap",
    "student/ece",
    "teacher/ece",
    "time/fit_s",
    "throughput/train_samples_per_s",
)


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"kdx · {metrics['method']} · {metrics['teacher']} → {metrics['student']} "
        f"on {metrics['dataset']} · seed {metrics['seed']}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        if metrics.get(key) is not None:
            table.add_row(key, f"{metrics[key]:.4f}")
    if metrics.get("teacher/source"):
        table.add_row("teacher", f"{metrics['teacher/source']}: {metrics.get('teacher/ckpt')}")
    Console().print(table)
    Console().print(f"metrics: {output_dir / 'metrics.json'}")


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _choice(group: str) -> str | None:
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


def _monitored(cfg: DictConfig, metrics: dict[str, Any]) -> float:
    key = str(cfg.get("monitor", "val/student/acc"))
    value = (
        metrics.get("student/val_acc_best")
        if key == "val/student/acc"
        else metrics.get(key.removeprefix("test/"))
    )
    return float("nan") if value is None else float(value)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    output_dir = Path(cfg.paths.output_dir)
    try:
        metrics = run(cfg)
    except Exception as err:
        user_error = isinstance(err, (KDXError, NonFiniteLossError, InstantiationException))
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        failure = {
            "status": "failed",
            "error": message,
            "error_type": type(cause).__name__,
            "seed": int(cfg.seed),
            "method": _choice("method"),
            "dataset": cfg.dataset.name,
            "teacher": cfg.teacher.name,
            "student": cfg.student.name,
        }
        atomic_write_json(output_dir / "metrics.json", failure)
        if _is_multirun():
            # the sweep goes on and kdx-table counts this run as failed; -inf (not NaN, which
            # optuna refuses) makes an Optuna sweep record it as the worst trial
            log.error("run failed: %s", message)
            return float("-inf")
        if not user_error:
            raise  # a bug, not a bad input: keep the traceback
        print(f"kdx: error: {message}", file=sys.stderr)
        sys.exit(2)
    if cfg.get("print_summary", True) and rank_zero_only.rank == 0:
        print_summary(metrics, output_dir)
    value = _monitored(cfg, metrics)
    return value if math.isfinite(value) else float("-inf")


if __name__ == "__main__":
    main()
