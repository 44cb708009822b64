"""Provide a teacher: load its weights safely, or train and cache it (``ckpt: auto``), then check it.

* ``teacher.ckpt=<path>``: a plain ``state_dict``, a Lightning checkpoint (kdx's own, whose student
  or teacher weights are taken, or any whose keys match after a ``model.`` prefix), or
  RepDistiller's ``{'model': ...}`` files.
* ``teacher.ckpt=auto``: the teacher is an ordinary kdx run of its own. Its config is composed from
  the recipe ``teacher.train`` alone (the teacher's model as the student, ``train.method`` as the
  method — ``none`` by default, ``ls`` for a label-smoothed teacher —, ``train.optim``,
  ``train.trainer``, ``train.epochs``, ``train.seed``) and run by :func:`kdx.train.run` into
  ``<cache_dir>/teachers/<name>-<key>/`` (logs, checkpoints, ``metrics.json``); its best-validation
  weights become ``<cache_dir>/teachers/<name>-<key>.pt``. The key hashes that recipe, the model
  config, the model's source code and the data — not the student's trainer settings — so a changed
  recipe trains a new teacher and a student-side change reuses the cached one. A file lock makes
  parallel jobs train it once; a waiting job says so until the lock is free.
* A cache entry is verified on every reuse: its ``.json`` record holds the same key (and so the
  same model-code fingerprint), and the weights load and fit the model (no NaN). A bad entry
  (truncated, stale, written by an older kdx) is moved aside to ``<name>.bad-<time>.pt`` with a
  message saying why, and retrained. Reuse only reads: a read-only cache holding the teacher works
  (the lock file is only made when training is needed).

Weights are always read with ``torch.load(..., weights_only=True)``. Any mismatch is one
:class:`~kdx.errors.KDXError` line that names the file and what did not fit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdx.errors import KDXError
from kdx.models.weights import load_weights
from kdx.utils import atomic_torch_save, atomic_write_json, sha256_file, stable_hash

log = logging.getLogger(__name__)

# data-module arguments that say where or how fast data is read, not what it is
_DATA_KEY_EXCLUDED = ("num_workers", "pin_memory", "cache_dir", "root", "eval_batch_size")


def model_code_fingerprint(model: nn.Module) -> str:
    """Hash of the source file that defines ``model``'s class (a changed architecture is a new key)."""
    try:
        source = Path(inspect.getsourcefile(type(model)) or "").read_bytes()
    except (TypeError, OSError):
        source = type(model).__qualname__.encode()
    return hashlib.sha256(source).hexdigest()[:12]


def teacher_key(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """Everything that decides which weights an auto-trained teacher ends up with."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    datamodule = {k: v for k, v in dataset.pop("datamodule").items() if k not in _DATA_KEY_EXCLUDED}
    return {
        "model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
        "model_code": model_code_fingerprint(model),
        "recipe": OmegaConf.to_container(cfg.teacher.train, resolve=True),
        "dataset": {**dataset, "datamodule": datamodule},
    }


def teacher_cache_path(cfg: DictConfig, model: nn.Module | None = None) -> Path:
    model = instantiate(cfg.teacher.model) if model is None else model
    return (
        Path(cfg.paths.cache_dir)
        / "teachers"
        / f"{cfg.teacher.name}-{stable_hash(teacher_key(cfg, model))}.pt"
    )


# ---------------------------------------------------------------------------------------------
# The teacher run


def teacher_run_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The teacher's own run config (conf/teacher_run.yaml + the recipe); the student run leaks nothing."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    recipe = cfg.teacher.train
    overrides = [f"method={recipe.get('method', 'none')}"]
    overrides += [f"method.{k}={v}" for k, v in (recipe.get("method_args") or {}).items()]
    if GlobalHydra.instance().is_initialized():  # inside kdx-train: the user's search path applies
        tcfg = compose(config_name="teacher_run", overrides=overrides)
    else:
        with initialize_config_module(config_module="kdx.conf", version_base="1.3"):
            tcfg = compose(config_name="teacher_run", overrides=overrides)
    resolved = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    with open_dict(tcfg):
        tcfg.seed = int(recipe.seed)
        tcfg.torch_threads = cfg.get("torch_threads")
        # whole nodes replaced, not merged: nothing of the defaults composed above may survive in them
        tcfg.dataset = resolved(cfg.dataset)
        tcfg.student = {
            "name": cfg.teacher.name,
            "model": resolved(cfg.teacher.model),
            "stage_names": cfg.teacher.get("stage_names"),
        }
        tcfg.optim = resolved(recipe.optim)
        tcfg.paths = {
            **{k: OmegaConf.select(cfg.paths, k) for k in cfg.paths if k != "output_dir"},
            "output_dir": str(run_dir),
        }
        # where to compute follows the student run; one device, so that under DDP the relaunched
        # ranks find the teacher cached instead of waiting on this lock
        tcfg.trainer.merge_with(
            {
                "accelerator": cfg.trainer.get("accelerator", "auto"),
                "devices": 1,
                "max_epochs": int(recipe.epochs),
                "enable_progress_bar": cfg.trainer.get("enable_progress_bar", True),
                **resolved(recipe.trainer),
            }
        )
    return tcfg


def _train_teacher(cfg: DictConfig, path: Path) -> dict[str, Any]:
    """Run the teacher's own kdx run next to ``path`` and store its best weights at ``path``."""
    from kdx.train import run  # the entry point's own run, kept out of import time

    run_dir = path.with_suffix("")
    tcfg = teacher_run_config(cfg, run_dir)
    log.info(
        "Training teacher %s with method %s for %d epochs; run folder %s",
        cfg.teacher.name,
        tcfg.method._target_.rsplit(".", 1)[-1],
        tcfg.trainer.max_epochs,
        run_dir,
    )
    metrics = run(tcfg)
    if metrics.get("status") != "ok":
        raise KDXError(f"teacher run {run_dir} ended with status {metrics.get('status')}; see {run_dir}")
    best = metrics.get("student/best_ckpt") or str(run_dir / "checkpoints" / "best.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    weights = {
        k.removeprefix("student.model."): v for k, v in state.items() if k.startswith("student.model.")
    }
    atomic_torch_save(weights, path)
    log.info(
        "Teacher %s: validation accuracy %.2f %%, test accuracy %.2f %% (best epoch); cached at %s",
        cfg.teacher.name,
        100 * (metrics.get("student/val_acc_best") or float("nan")),
        100 * (metrics.get("student/acc_best") or float("nan")),
        path,
    )
    return metrics


def _lock(path: Path):
    from filelock import FileLock

    return FileLock(str(path) + ".lock")


def _wait_for_lock(lock, name: str, path: Path) -> None:
    """Acquire ``lock``, saying every ``KDX_LOCK_NOTICE_S`` seconds (30) who is being waited for."""
    from filelock import Timeout

    started = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=float(os.environ.get("KDX_LOCK_NOTICE_S", 30)))
            return
        except Timeout:
            message = (
                f"waiting for teacher {name}: another process is training it ({path}.lock held, "
                f"{time.monotonic() - started:.0f} s so far)"
            )
            log.warning(message)
            print(f"kdx: {message}", file=sys.stderr, flush=True)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new))
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} → {new!r})"]


def _say_why_not_reused(path: Path, key: dict[str, Any]) -> None:
    """Name the key fields in which the closest cached teacher of the same name differs."""
    closest: tuple[int, list[str], Path] | None = None
    for record in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.json"):
        try:
            old_key = json.loads(record.read_text()).get("key")
        except (OSError, ValueError):
            continue
        if isinstance(old_key, dict):
            diff = _differences(old_key, key)
            if closest is None or len(diff) < closest[0]:
                closest = (len(diff), diff, record)
    if closest is not None and closest[1]:
        log.info(
            "No cached teacher for this recipe; the closest, %s, differs in: %s",
            closest[2].with_suffix(".pt").name,
            "; ".join(closest[1][:5]),
        )


def _entry_problem(path: Path, key: dict[str, Any], model: nn.Module) -> str | None:
    """Why the cache entry at ``path`` cannot be used for ``key`` (``None``: it can, and ``model``
    now holds its weights). Reads only: a read-only cache that holds the teacher works."""
    record_path = path.with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as err:
        return f"its record {record_path.name} is missing or unreadable ({type(err).__name__})"
    recorded = record.get("key") if isinstance(record, dict) else None
    expected = json.loads(json.dumps(key, default=str))  # the key as JSON stores it
    if not isinstance(recorded, dict):
        return f"its record {record_path.name} holds no key"
    if recorded.get("model_code") != expected["model_code"]:
        return (
            f"it was trained with other model code (fingerprint {recorded.get('model_code')}, "
            f"now {expected['model_code']})"
        )
    if recorded != expected:
        return f"its recorded key differs in: {'; '.join(_differences(recorded, expected)[:3])}"
    try:
        load_weights(model, path)
    except KDXError as err:
        return str(err).split("; ", 1)[0]  # the diagnosis; its advice is for files a user passes
    return None


def _move_aside(path: Path, why: str) -> Path:
    """Rename a bad entry (and its record) to ``<name>.bad-<time>.*``: kept for a post-mortem, out of the way."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.stem}.bad-{stamp}{path.suffix}")
    os.replace(path, aside)
    for companion in (path.with_suffix(".json"), path.with_suffix("")):  # its record and its run folder
        if companion.exists():
            os.replace(companion, aside.with_suffix(companion.suffix))
    message = f"cached teacher {path} is unusable: {why}; moved aside to {aside.name}, training it again"
    log.warning(message)
    print(f"kdx: {message}", file=sys.stderr, flush=True)
    return aside


def _auto_teacher(cfg: DictConfig, model: nn.Module, info: dict[str, Any]) -> Path:
    """The cached teacher's path, its weights loaded into ``model``; trained (or retrained) when
    missing or bad. The lock (a file in the cache) is taken only when training is needed."""
    key = teacher_key(cfg, model)
    path = Path(cfg.paths.cache_dir) / "teachers" / f"{cfg.teacher.name}-{stable_hash(key)}.pt"
    problem = _entry_problem(path, key, model) if path.is_file() else None
    if path.is_file() and problem is None:
        log.info("Reusing cached teacher %s", path)
        info["teacher/source"] = "cache"
        return path
    if rank_zero_only.rank != 0:
        raise KDXError(
            f"teacher {path} is not usable in the cache on rank {rank_zero_only.rank}"
            f"{f' ({problem})' if problem else ''}; rank 0 trains it before the other ranks start — "
            "under srun, train it first in a single-process run"
        )
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # made below if missing
    if not os.access(existing, os.W_OK):
        raise KDXError(
            f"teacher {path} is {'unusable: ' + problem if problem else 'not in the cache'} and the cache "
            f"is read-only; set paths.cache_dir (or KDX_CACHE_DIR) to a writable folder or pass teacher.ckpt=<path>"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if problem is None:
        _say_why_not_reused(path, key)
    lock = _lock(path)
    _wait_for_lock(lock, cfg.teacher.name, path)
    try:
        if path.is_file():  # trained meanwhile by another process, or the bad entry found above
            problem = _entry_problem(path, key, model)
            if problem is None:
                log.info("Reusing teacher %s, trained meanwhile by another process", path)
                info["teacher/source"] = "cache"
                return path
            info["teacher/retrained_because"] = problem
            _move_aside(path, problem)
        metrics = _train_teacher(cfg, path)
        atomic_write_json(
            path.with_suffix(".json"),
            {
                "key": key,
                "val_acc": metrics.get("student/val_acc_best"),
                "test_acc": metrics.get("student/acc_best"),
                "run_dir": str(path.with_suffix("")),
                "config": OmegaConf.to_container(cfg.teacher, resolve=True),
            },
        )
        load_weights(model, path)
        info["teacher/source"] = "retrained" if info.get("teacher/retrained_because") else "trained"
        return path
    finally:
        lock.release()


def provide_teacher(cfg: DictConfig) -> tuple[nn.Module | None, dict]:
    """Build the teacher of ``cfg.teacher`` and give it weights; ``(None, {})`` when there is none."""
    tcfg = cfg.teacher
    if tcfg.get("model") is None:
        return None, {}
    # the teacher's initial weights belong to its recipe, not to whichever job builds it first
    if tcfg.get("train") is not None:
        L.seed_everything(tcfg.train.seed, workers=True, verbose=False)
    model: nn.Module = instantiate(tcfg.model)
    ckpt = tcfg.get("ckpt")
    info: dict[str, Any] = {"teacher/name": tcfg.name}
    if ckpt is None:
        raise KDXError(f"teacher={tcfg.name} has no weights: set teacher.ckpt=<path> or teacher.ckpt=auto")
    if str(ckpt) == "auto":
        path = _auto_teacher(cfg, model, info)  # verified and loaded
    else:
        path = Path(str(ckpt)).expanduser()
        info["teacher/source"] = "file"
        load_weights(model, path)
    info["teacher/ckpt"] = str(path)
    info["teacher/sha256"] = sha256_file(path)
    return model, info


def check_teacher(cfg: DictConfig, model: nn.Module) -> float | None:
    """Validation accuracy of the teacher (``trainer.validate`` on the run's accelerator, one device);
    stops the run below ``teacher.min_acc``. Ranks other than 0 trust rank 0's check."""
    from kdx.factory import build_module, build_trainer
    from kdx.methods.base import METHODS
    from kdx.models.adapter import as_feature_model
    from kdx.models.base import LOGITS

    if rank_zero_only.rank != 0:
        return None
    name, num_classes = cfg.teacher.name, int(cfg.dataset.num_classes)
    input_shape = cfg.dataset.get("input_shape")
    if input_shape is not None:
        logits = as_feature_model(model).probe(tuple(input_shape), (LOGITS,)).logits
        if logits.shape[-1] != num_classes:
            raise KDXError(
                f"teacher={name} outputs {logits.shape[-1]} classes but the data set has {num_classes}; "
                "set the teacher's num_classes to the data set's"
            )
    module = build_module(
        OmegaConf.create({"dataset": {"num_classes": num_classes}, "student": {"stage_names": None}}),
        model,
        METHODS["none"](),
    )
    trainer = build_trainer(
        OmegaConf.create({"_target_": "lightning.Trainer"}),
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        num_nodes=1,
        strategy="auto",
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    was_training = model.training
    results = trainer.validate(module, datamodule=instantiate(cfg.dataset.datamodule), verbose=False)
    model.train(was_training).cpu()
    acc = float(results[0]["val/student/acc"])
    if acc < float(cfg.teacher.min_acc):
        raise KDXError(
            f"teacher={name} has validation accuracy {acc:.4f} < teacher.min_acc={cfg.teacher.min_acc}; "
            "train it longer (teacher.train.epochs), pass a better teacher.ckpt, or lower teacher.min_acc"
        )
    log.info("Teacher %s: validation accuracy %.2f %%", name, 100 * acc)
    return acc
