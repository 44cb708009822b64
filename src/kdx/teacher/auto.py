"""``teacher.ckpt=auto``: the teacher is an ordinary kdx run of its own, trained once and cached.

Its config is composed from the recipe ``teacher.train`` alone (the teacher's model as the student,
``train.method`` as the method — ``none`` by default, ``ls`` for a label-smoothed teacher —,
``train.optim``, ``train.trainer``, ``train.epochs``, ``train.seed``) and run by the pipeline's
``run``, which the caller passes in (this package imports no entry point), into
``<cache_dir>/teachers/<name>-<key>/`` (logs, checkpoints, ``metrics.json``); its best-validation
weights become ``<cache_dir>/teachers/<name>-<key>.pt``. The key (:mod:`kdx.teacher.key`) hashes
that recipe, the model config, the model's source code and the data — not the student's trainer
settings — so a changed recipe trains a new teacher and a student-side change reuses the cached one.
A file lock makes parallel jobs train it once; a waiting job says so until the lock is free.

A cache entry is verified on every reuse: its ``.json`` record holds the same key (and so the same
model-code fingerprint), and the weights load and fit the model (no NaN). A bad entry (truncated,
stale, written by an older kdx) is moved aside to ``<name>.bad-<time>.pt`` with a message saying
why, and retrained. Reuse only reads: a read-only cache holding the teacher works (the lock file is
only made when training is needed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdx.errors import KDXError
from kdx.models.weights import load_weights
from kdx.record import RunRecord
from kdx.teacher.key import cached_teacher_path, teacher_dataset, teacher_key
from kdx.utils import atomic_torch_save, atomic_write_json

log = logging.getLogger("kdx.teacher")

RunFn = Callable[[DictConfig], dict[str, Any]]
"""The pipeline's ``run``: one kdx run of a composed config, returning its metrics.json figures."""


def teacher_run_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The teacher's own run config (conf/teacher_run.yaml + the recipe); the student run leaks nothing."""
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
        tcfg.cpu_allocator = cfg.get("cpu_allocator", "retain")
        # whole nodes replaced, not merged: nothing of the defaults composed above may survive in them
        tcfg.dataset = resolved(teacher_dataset(cfg))
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


def train_teacher(cfg: DictConfig, path: Path, run: RunFn) -> RunRecord:
    """Run the teacher's own kdx run (``run``: the pipeline's) next to ``path`` and store its best
    weights at ``path``."""
    run_dir = path.with_suffix("")
    tcfg = teacher_run_config(cfg, run_dir)
    log.info(
        "Training teacher %s with method %s for %d epochs; run folder %s",
        cfg.teacher.name,
        tcfg.method._target_.rsplit(".", 1)[-1],
        tcfg.trainer.max_epochs,
        run_dir,
    )
    result = RunRecord.from_dict(run(tcfg))
    if not result.ok:
        raise KDXError(f"teacher run {run_dir} ended with status {result.status}; see {run_dir}")
    best = result.student_best_ckpt or str(run_dir / "checkpoints" / "best.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    weights = {
        k.removeprefix("student.model."): v for k, v in state.items() if k.startswith("student.model.")
    }
    atomic_torch_save(weights, path)
    log.info(
        "Teacher %s: validation accuracy %.2f %%, test accuracy %.2f %% (best epoch); cached at %s",
        cfg.teacher.name,
        100 * (result.student_val_acc_best or float("nan")),
        100 * (result.student_acc_best or float("nan")),
        path,
    )
    return result


def _lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock")


def _wait_for_lock(lock, name: str, path: Path) -> None:
    """Acquire ``lock``, saying every ``KDX_LOCK_NOTICE_S`` seconds (30) who is being waited for."""
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


def auto_teacher(cfg: DictConfig, model: nn.Module, info: dict[str, Any], run: RunFn | None) -> Path:
    """The cached teacher's path, its weights loaded into ``model``; trained (or retrained) with
    ``run`` when missing or bad (``run=None``: a tool that trains no teacher, an error then). The lock
    (a file in the cache) is taken only when training is needed."""
    key = teacher_key(cfg, model)
    path = cached_teacher_path(cfg, model)
    problem = _entry_problem(path, key, model) if path.is_file() else None
    if path.is_file() and problem is None:
        log.info("Reusing cached teacher %s", path)
        info["teacher/source"] = "cache"
        return path
    if run is None:
        raise KDXError(
            f"teacher {path} is {'unusable: ' + problem if problem else 'not in the cache'}; train it "
            "with kdx-train (teacher.ckpt=auto) first, or pass teacher.ckpt=<path>"
        )
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
        result = train_teacher(cfg, path, run)
        atomic_write_json(
            path.with_suffix(".json"),
            {
                "key": key,
                "val_acc": result.student_val_acc_best,
                "test_acc": result.student_acc_best,
                "run_dir": str(path.with_suffix("")),
                "config": OmegaConf.to_container(cfg.teacher, resolve=True),
            },
        )
        load_weights(model, path)
        info["teacher/source"] = "retrained" if info.get("teacher/retrained_because") else "trained"
        return path
    finally:
        lock.release()
