"""``kdx-train``: compose → build → (cached teacher run) → fit → test → metrics.json.

    kdx-train                                   # MNIST-1D, CNN teacher (auto-trained, cached), MLP student, KD
    kdx-train method=none seed=1 trainer.max_epochs=10
    kdx-train -m method=none,kd seed=0,1,2      # six run folders, each with metrics.json

Every run goes through one wrapper (:func:`run_job`). A user error (:class:`~kdx.errors.KDXError`:
bad path, class-count mismatch, bad hyper-parameter, NaN loss) is printed as one line and the
process exits 2; anything else is a bug: its full traceback goes to stderr and to the run's log and
the process exits 1. Either way the run folder gets a ``metrics.json`` with ``status: failed``, the
error's type and message and the log's path, the loggers are closed, and in a multirun the sweep
goes on (the multirun then exits non-zero once every job has run).

``metrics.json`` is the one contract with ``kdx-table``: besides the figures it carries the run's
group choices, its resolved config, the experiment's published numbers, tags and label.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import sys
import time
import traceback
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
from omegaconf import DictConfig, OmegaConf, open_dict

import kdx
import kdx.methods  # noqa: F401 - registers every method's schema before composition
from kdx.callbacks import ReportsMetrics, TrainingThroughput
from kdx.errors import HyperParameterError, KDXError
from kdx.factory import build_module, build_trainer
from kdx.module import DistillationModule
from kdx.teacher import check_teacher, provide_teacher
from kdx.utils import atomic_write_json
from kdx.validate import named_run_checkpoint, validate_config

log = logging.getLogger("kdx")

# Noise that says nothing about a kdx run: the frozen teacher is in eval mode on purpose, and
# Lightning's advertisement and a deprecation inside Lightning itself.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda r: "litlogger" not in r.getMessage()
)
# conf/ ships inside the package as kdx.conf (the top-level conf/ folder is mapped onto it), so an
# installed wheel finds its configs wherever kdx-train is launched from.
CONFIG_DIR = "pkg://kdx.conf"


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


# ---------------------------------------------------------------------------------------------
# Provenance: what metrics.json says about the run (also for failed runs)


def _hydra_choices() -> dict[str, str] | None:
    try:
        choices = HydraConfig.get().runtime.choices
    except ValueError:  # not inside a Hydra app (tests, the teacher run)
        return None
    return {
        k: v
        for k, v in OmegaConf.to_container(choices).items()
        if not k.startswith("hydra/") and v is not None
    }


def _choices(cfg: DictConfig, method_name: str | None = None) -> dict[str, str]:
    from_hydra = _hydra_choices()
    if from_hydra is not None and cfg.get("task_name") != "teacher":
        return from_hydra
    return {
        "dataset": str(cfg.dataset.get("name")),
        "teacher": str(cfg.teacher.get("name")),
        "student": str(cfg.student.get("name")),
        "method": method_name or _target_name(cfg.method),
    }


def _target_name(node: Any) -> str:
    from kdx.methods.base import METHODS

    target = str(node.get("_target_", "?")) if node is not None else "?"
    return next(
        (name for name, cls in METHODS.items() if f"{cls.__module__}.{cls.__qualname__}" == target), target
    )


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config with interpolations resolved, key by key: one that cannot be resolved here (a
    ``${hydra:...}`` outside a Hydra app, a bad value being reported) stays as written."""
    out: dict[str, Any] = {}
    for key in cfg:
        try:
            value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=True)
            out[str(key)] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except Exception:  # noqa: BLE001 - an unresolvable value is itself worth recording as written
            node = cfg._get_node(str(key))
            out[str(key)] = (
                OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else str(node)
            )
    return out


def provenance(cfg: DictConfig, method_name: str | None = None) -> dict[str, Any]:
    """The keys every metrics.json has, whatever the run's outcome."""
    choices = _choices(cfg, method_name)
    published = cfg.get("published")
    return {
        "seed": cfg.get("seed"),
        "method": method_name or choices.get("method"),
        "label": cfg.get("label"),
        "dataset": cfg.dataset.get("name"),
        "teacher": cfg.teacher.get("name"),
        "student": cfg.student.get("name"),
        "choices": choices,
        "tags": list(cfg.get("tags") or []),
        "published": OmegaConf.to_container(published, resolve=True) if published is not None else None,
        "config": _resolved(cfg),
        "versions": _versions(),
    }


def run_name(cfg: DictConfig, method_name: str) -> str:
    """What tells a run apart in a sweep: ``kd-resnet8x4-resnet32x4-s1``."""
    parts = [cfg.get("label") or method_name, cfg.student.get("name")]
    if cfg.teacher.get("model") is not None:
        parts.append(cfg.teacher.get("name"))
    return "-".join(str(p) for p in parts) + f"-s{cfg.get('seed')}"


# ---------------------------------------------------------------------------------------------
# Build and run


def build(cfg: DictConfig) -> tuple[DistillationModule, L.LightningDataModule, dict]:
    """Everything a run needs, checked for consistency, before any training.

    The data is prepared by Lightning's own hooks (``prepare_data`` once per node, then ``setup``)
    inside the teacher run, the teacher check and ``fit``; nothing here reads it.
    """
    datamodule: L.LightningDataModule = instantiate(cfg.dataset.datamodule)
    if int(datamodule.num_classes) != int(cfg.dataset.num_classes):
        raise KDXError(
            f"dataset={cfg.dataset.name}: the config says num_classes={cfg.dataset.num_classes} "
            f"but the data has {datamodule.num_classes}; fix dataset.num_classes"
        )
    method = _instantiate_method(cfg.method)
    student = instantiate(cfg.student.model)
    student_classes = getattr(student, "num_classes", None)
    if student_classes is not None and int(student_classes) != int(cfg.dataset.num_classes):
        raise KDXError(
            f"student={cfg.student.name} has {student_classes} classes but dataset={cfg.dataset.name} "
            f"has {cfg.dataset.num_classes}; leave student.model.num_classes at ${{dataset.num_classes}}"
        )
    input_shape = cfg.dataset.get("input_shape")
    _check_reads_input(student, input_shape, "student", cfg)
    info: dict[str, Any] = {}
    teacher = None
    if method.teacher_use.needs_teacher or cfg.teacher.get("model") is not None:
        if method.teacher_use.needs_teacher and cfg.teacher.get("model") is None:
            raise KDXError(
                f"method={method.name} needs a teacher but teacher=none; pick one, e.g. teacher=cnn1d"
            )
        _check_reads_input(instantiate(cfg.teacher.model), input_shape, "teacher", cfg)
        if method.teacher_use.trains_teacher and not method.uses_teacher_weights():
            pretrained = cfg.teacher.model.get("name_or_path")  # e.g. a Hugging Face checkpoint folder
            source = f"pre-trained weights of {pretrained}" if pretrained else "random init"
            teacher, info = instantiate(cfg.teacher.model), {"teacher/source": source}
        else:
            teacher, info = provide_teacher(cfg)
            info["teacher/val_acc"] = check_teacher(cfg, teacher)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same student init whatever the teacher did
    student = instantiate(cfg.student.model)
    info["warnings"] = [
        *method.run_warnings(cfg.trainer.get("max_epochs")),
        *_setup_warnings(cfg, student, teacher, info),
    ]
    for warning in info["warnings"]:
        log.warning("kdx: warning: %s", warning)
    return build_module(cfg, student, method, teacher), datamodule, info


def _instantiate_method(node: DictConfig):
    """The method; a ``ValueError`` from its constructor is a hyper-parameter out of range (a user
    error: one line, exit 2), anything else raised there stays a bug (traceback, exit 1)."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = _root_cause(err)
        if isinstance(cause, ValueError) and not isinstance(cause, KDXError):
            raise HyperParameterError(str(cause)) from err
        raise


def _check_reads_input(model: torch.nn.Module, input_shape: Any, role: str, cfg: DictConfig) -> None:
    """Fail now, with the fix, when a model cannot read the data set's inputs (an image model on 1-D data)."""
    if input_shape is None:
        return
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape))
    except Exception as err:  # noqa: BLE001 - whatever the model raises, the fix is the same
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KDXError(
            f"{role}={cfg[role].name} cannot read dataset={cfg.dataset.name}'s inputs of shape {tuple(input_shape)} "
            f"({type(err).__name__}: {reason}); pick a {role} made for this data (e.g. mlp / cnn1d for 1-D "
            "signals, a CIFAR zoo model or timm for images) or a data set it can read"
        ) from None
    finally:
        model.train(was_training)


def _setup_warnings(cfg: DictConfig, student: torch.nn.Module, teacher: Any, info: dict) -> list[str]:
    """Runs that are legal but likely not what the user meant."""
    found = []
    chance = 1.0 / int(cfg.dataset.num_classes)
    if info.get("teacher/val_acc") is not None and info["teacher/val_acc"] < 1.5 * chance:
        found.append(
            f"teacher={cfg.teacher.name} validates at {100 * info['teacher/val_acc']:.1f} % (chance: "
            f"{100 * chance:.1f} %): distilling from it teaches nothing; train it longer or pass a better teacher.ckpt"
        )
    if teacher is not None:
        sizes = [sum(p.numel() for p in m.parameters()) for m in (student, teacher)]
        if sizes[0] > sizes[1]:
            found.append(
                f"student={cfg.student.name} ({sizes[0]:,} parameters) is larger than teacher="
                f"{cfg.teacher.name} ({sizes[1]:,}); is teacher=/student= the right way round?"
            )
    choices = _hydra_choices() or {}
    if str(cfg.dataset.name).startswith(("cifar", "imagenet")) and not choices.get("experiment"):
        found.append(
            f"dataset={cfg.dataset.name} with the default recipe (optim={choices.get('optim', '?')}, "
            f"{cfg.trainer.get('max_epochs')} epochs) made for MNIST-1D; for published numbers use an "
            "experiment= recipe, e.g. experiment=crd_cifar100/resnet32x4_resnet8x4"
        )
    return found


def _instantiate_dict(node: DictConfig | None, **extra: Any) -> list:
    return [
        instantiate(c, **extra.get(k, {}))
        for k, c in (node or {}).items()
        if c is not None and "_target_" in c
    ]


def _sweep_group() -> str | None:
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def _loggers(cfg: DictConfig, name: str) -> list:
    """The configured loggers; W&B runs get a name and a group that tell the jobs of a sweep apart."""
    extra: dict[str, dict] = {}
    for key, node in (cfg.get("logger") or {}).items():
        if node is not None and str(node.get("_target_", "")).endswith("WandbLogger"):
            group = _sweep_group() or f"{cfg.dataset.name}-{cfg.teacher.name}-{cfg.student.name}"
            extra[key] = {"name": node.get("name") or name, "group": node.get("group") or group}
    return _instantiate_dict(cfg.get("logger"), **extra)


def _finish_loggers(loggers: list, status: str) -> None:
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception:  # noqa: BLE001 - closing a logger must not hide the run's own outcome
            log.warning("could not finalize logger %s", type(logger).__name__, exc_info=True)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if status == "success" else 1)  # the next job of a sweep gets its own run


def _log_hparams(loggers: list, cfg: DictConfig, metrics: dict[str, float] | None = None) -> None:
    params = _resolved(cfg)
    for logger in loggers:
        if metrics is not None and type(logger).__name__ == "TensorBoardLogger":
            logger.log_hyperparams(params, metrics={f"hparams/{k}": v for k, v in metrics.items()})
        elif metrics is None:
            logger.log_hyperparams(params)


def _best_checkpoint(trainer: L.Trainer, monitor: str):
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == monitor), None)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One training run; returns the figures written to ``<output_dir>/metrics.json``."""
    validate_config(cfg)  # before any data or teacher work (issue 14)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    module, datamodule, teacher_info = build(cfg)
    method_name = module.method.name
    callbacks = [*_instantiate_dict(cfg.get("callbacks"))]
    if not any(isinstance(c, TrainingThroughput) for c in callbacks):
        callbacks.append(TrainingThroughput())
    loggers = _loggers(cfg, run_name(cfg, method_name))
    status = "failed"
    try:
        _log_hparams(loggers, cfg)
        trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        fit_s = time.perf_counter() - started
        if trainer.global_step == 0:
            raise KDXError(
                f"no training step ran (trainer.max_epochs={cfg.trainer.get('max_epochs')}, "
                f"limit_train_batches={cfg.trainer.get('limit_train_batches', 1.0)}); "
                "give the run at least one epoch with at least one batch"
            )
        metrics = _evaluate(cfg, trainer, module, datamodule)
        status = "success"
    finally:
        _finish_loggers(loggers, status)
    for callback in callbacks:  # callbacks with headline figures of their own (diagnostics, throughput)
        if isinstance(callback, ReportsMetrics):
            metrics.update(callback.report())
    metrics.update(
        {
            "status": "ok",
            "time/fit_s": fit_s,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "teacher/sha256": teacher_info.get("teacher/sha256"),
            **provenance(cfg, method_name),
        }
    )
    metrics.update({k: v for k, v in teacher_info.items() if k not in metrics})
    # the build's warnings and those of callbacks (DivergenceMonitor), each once
    found = [*teacher_info.get("warnings", []), *(metrics.get("warnings") or [])]
    metrics["warnings"] = list(dict.fromkeys(found))
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "metrics.json", metrics)
    _log_hparams(loggers, cfg, {k: v for k, v in metrics.items() if k.startswith("student/acc")})
    return metrics


def _evaluate(cfg: DictConfig, trainer: L.Trainer, module, datamodule) -> dict[str, Any]:
    """Test figures of the last epoch and of the epoch the monitor picked."""
    monitor = str(cfg.get("monitor", "val/student/acc"))
    best_ckpt = _best_checkpoint(trainer, monitor)
    best_score = (
        None
        if best_ckpt is None or best_ckpt.best_model_score is None
        else _float(best_ckpt.best_model_score)
    )
    metrics: dict[str, Any] = {
        "monitor": monitor,
        "monitor_mode": cfg.get("monitor_mode", "max"),
        "monitor/best": best_score,
        "student/val_acc_best": best_score if monitor == "val/student/acc" else None,
    }
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
    return metrics


SUMMARY_PERCENT = (
    "student/acc",
    "student/acc_best",
    "teacher/acc",
    "fidelity/agreement",
    "student/ece",
    "teacher/ece",
)
SUMMARY_PLAIN = (
    "fidelity/kl",
    "fidelity/kernel_gap",
    "fidelity/cka",
    "time/fit_s",
    "throughput/train_samples_per_s",
)


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"kdx · {metrics['label'] or metrics['method']} · {metrics['teacher']} → {metrics['student']} "
        f"on {metrics['dataset']} · seed {metrics['seed']}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_PERCENT:
        if metrics.get(key) is not None:
            table.add_row(key, f"{100 * metrics[key]:.2f} %")
    for key in SUMMARY_PLAIN:
        if metrics.get(key) is not None:
            table.add_row(key, f"{metrics[key]:.4g}")
    if metrics.get("teacher/source"):
        table.add_row("teacher", f"{metrics['teacher/source']}: {metrics.get('teacher/ckpt')}")
    Console().print(table)
    for warning in metrics.get("warnings") or []:
        Console().print(f"[yellow]warning:[/yellow] {warning}")
    Console().print(f"metrics: {output_dir / 'metrics.json'}")


# ---------------------------------------------------------------------------------------------
# The run wrapper


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _root_cause(err: BaseException) -> BaseException:
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _log_file(cfg: DictConfig) -> str | None:
    try:
        return str(Path(HydraConfig.get().runtime.output_dir) / f"{cfg.task_name}.log")
    except (ValueError, KeyError):
        return None


def failure_record(cfg: DictConfig, err: BaseException) -> dict[str, Any]:
    cause = _root_cause(err)
    message = str(cause).strip() or type(cause).__name__
    try:
        record = provenance(cfg)
    except Exception:  # noqa: BLE001 - the record of a failure must not fail itself
        record = {"seed": str(cfg.get("seed"))}
    return {
        **record,
        "status": getattr(cause, "status", "failed"),  # DivergenceError: "diverged"
        "error": message,
        "error_type": type(cause).__name__,
        "log": _log_file(cfg),
    }


def worst_score(cfg: DictConfig) -> float:
    # -inf (not NaN, which optuna refuses) makes an Optuna sweep record a failed job as the worst trial
    return float("inf") if str(cfg.get("monitor_mode", "max")) == "min" else float("-inf")


def run_job(cfg: DictConfig) -> float:
    """Run, and turn any failure into a failed ``metrics.json``, a log entry and an exit code."""
    output_dir = Path(cfg.paths.output_dir)
    try:
        metrics = run(cfg)
    except Exception as err:
        cause = _root_cause(err)
        user_error = isinstance(cause, KDXError)
        if rank_zero_only.rank == 0:
            atomic_write_json(output_dir / "metrics.json", failure_record(cfg, err))
        if user_error:
            log.error("kdx: error: %s", cause)
        else:  # a bug: the traceback goes to the run's log file and to stderr
            log.error("run failed with an unexpected %s", type(cause).__name__, exc_info=err)
        if _is_multirun():
            return worst_score(cfg)
        if user_error:
            print(f"kdx: error: {cause}", file=sys.stderr)
            sys.exit(2)
        traceback.print_exception(err, file=sys.stderr)
        sys.exit(1)
    if cfg.get("print_summary", True) and rank_zero_only.rank == 0:
        print_summary(metrics, output_dir)
    value = metrics.get("monitor/best")
    return float(value) if value is not None and math.isfinite(value) else worst_score(cfg)


def _name_replaced_models(cfg: DictConfig) -> None:
    """A model swapped in on the command line (``student.model._target_=my.Net``,
    ``model@student.model=resnet8``) is recorded under its own name, never the group default's."""
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        for role in ("student", "teacher"):
            if key in (f"{role}.model._target_", f"model@{role}.model") and value:
                with open_dict(cfg):
                    cfg[role].name = value.rsplit(".", 1)[-1]


def _run_folder_of(path: Path) -> Path | None:
    return next((p for p in path.resolve().parents if (p / ".hydra" / "overrides.yaml").is_file()), None)


def resume_config(cfg: DictConfig) -> DictConfig:
    """``ckpt_path`` inside a kdx run folder: continue that run — its own config (plus this command
    line's overrides), in its own folder — and say so."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt or _is_multirun():
        return cfg
    path = named_run_checkpoint(Path(str(ckpt)).expanduser())  # a run folder: its last.ckpt
    run_dir = _run_folder_of(path) if path.is_file() else None
    if run_dir is None:
        return cfg
    from hydra import compose

    own = [o for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml") if not o.startswith("ckpt_path=")]
    given = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    resumed = compose(config_name="train", overrides=[*own, *given, f"ckpt_path={path.resolve()}"])
    with open_dict(resumed):
        resumed.paths.output_dir = str(run_dir)
    handler = logging.FileHandler(run_dir / f"{resumed.task_name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    message = (
        f"resuming run {run_dir} from {path.name} with its own config"
        f" ({' '.join(own) or 'the defaults'})"
        + (f" and this command line's {' '.join(given)}" if given else "")
    )
    log.info(message)
    print(f"kdx: {message}", file=sys.stderr, flush=True)
    return resumed


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    _name_replaced_models(cfg)
    resumed = resume_config(cfg)
    try:
        return run_job(resumed)
    finally:
        if resumed is not cfg:  # the run went on in its own folder: drop the empty one Hydra made
            made = Path(cfg.paths.output_dir)
            if {p.name for p in made.iterdir()} <= {".hydra", f"{cfg.task_name}.log"}:
                shutil.rmtree(made, ignore_errors=True)


if __name__ == "__main__":
    main()
