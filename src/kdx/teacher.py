"""Provide a teacher: load its weights safely, or train and cache it (``ckpt: auto``), then check it.

* ``teacher.ckpt=<path>``: a plain ``state_dict`` or a Lightning checkpoint (kdx's own, whose
  student or teacher weights are taken, or any whose keys match after a ``model.`` prefix).
* ``teacher.ckpt=auto``: train the teacher with method ``none`` and the recipe in ``teacher.train``,
  on one device (for a multi-GPU teacher, train it as a student with ``method=none`` and pass its
  checkpoint), and cache it under ``<cache_dir>/teachers/<name>-<hash>.pt``; the hash covers the model, the data
  and the recipe, so a changed recipe trains a new teacher and an unchanged one is reused. A file
  lock makes parallel jobs (joblib, SLURM arrays on a shared disk) train it once.

Weights are always read with ``torch.load(..., weights_only=True)``. Any mismatch is one
:class:`~kdx.errors.KDXError` line that names the file and what did not fit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdx.errors import KDXError
from kdx.methods.base import METHODS
from kdx.utils import atomic_torch_save, atomic_write_json, sha256_file, stable_hash

log = logging.getLogger(__name__)

# Lightning checkpoints of kdx runs keep models under these prefixes; the one named like the
# model asked for wins (a kdx run trained with method=none holds only a student).
_PREFIXES = ("teacher.model.", "student.model.", "model.", "module.")


def teacher_cache_path(cfg: DictConfig) -> Path:
    recipe = {
        "model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
        "train": OmegaConf.to_container(cfg.teacher.train, resolve=True),
        "dataset": {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()},
        "precision": str(cfg.trainer.get("precision")),
    }
    recipe["dataset"]["datamodule"] = {
        k: v
        for k, v in recipe["dataset"]["datamodule"].items()
        if k not in ("num_workers", "pin_memory", "cache_dir", "root")
    }
    return Path(cfg.paths.cache_dir) / "teachers" / f"{cfg.teacher.name}-{stable_hash(recipe)}.pt"


def _state_dict_from(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        full = obj["state_dict"]
        for prefix in sorted(_PREFIXES, key=lambda p: not p.startswith(f"{what}.")):
            picked = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
            if picked:
                return picked
        return full
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # RepDistiller's released teachers
        return _state_dict_from(obj["model"], path, what)
    raise KDXError(f"teacher checkpoint {path} holds neither a state_dict nor a Lightning checkpoint")


def load_weights(model: nn.Module, path: str | Path, what: str = "teacher") -> None:
    path = Path(path)
    if not path.is_file():
        raise KDXError(
            f"{what} checkpoint not found: {path}; pass {what}.ckpt=<existing file> "
            f"or {what}.ckpt=auto to train and cache one"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise KDXError(
            f"{what} checkpoint {path} cannot be loaded safely (weights_only=True): "
            f"{str(err).splitlines()[0]}"
        ) from None
    state = _state_dict_from(obj, path, what)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KDXError(
            f"{what} checkpoint {path} does not fit {what} model {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            f"is {what}= the architecture the checkpoint was trained with?"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            hint = ""
            if value.dim() >= 1 and own[key].dim() == value.dim() and own[key].shape[1:] == value.shape[1:]:
                hint = (
                    f" — class-count mismatch: the checkpoint has {value.shape[0]} classes, "
                    f"the model {own[key].shape[0]}; check dataset= and the checkpoint"
                )
            raise KDXError(
                f"{what} checkpoint {path}: '{key}' has shape {tuple(value.shape)} in the file "
                f"but {tuple(own[key].shape)} in the model{hint}"
            )
    model.load_state_dict(state)


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_teacher(cfg: DictConfig, model: nn.Module, datamodule: L.LightningDataModule) -> float:
    """Fit ``model`` with method ``none`` and ``cfg.teacher.train``; returns validation accuracy."""
    from kdx.module import DistillationModule  # the entry point's dependency, kept out of import time

    recipe = cfg.teacher.train
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    module = DistillationModule(
        student=model,
        method=METHODS["none"](),
        num_classes=cfg.dataset.num_classes,
        optimizer=instantiate(recipe.optim.optimizer),
        scheduler=instantiate(recipe.optim.scheduler) if recipe.optim.get("scheduler") else None,
        scheduler_interval=recipe.optim.get("interval", "epoch"),
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_epochs=recipe.epochs,
        # one device: under `strategy=ddp` Lightning relaunches this script for the other ranks, and
        # they must find the teacher cached rather than wait on the lock this process holds
        devices=1,
        num_nodes=1,
        strategy="auto",
        sync_batchnorm=False,
        limit_train_batches=recipe.trainer.get("limit_train_batches", 1.0),
        limit_val_batches=1.0,
        fast_dev_run=False,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(Path(cfg.paths.cache_dir) / "teachers"),
        check_val_every_n_epoch=max(1, recipe.epochs),
    )
    trainer.fit(module, datamodule=datamodule, weights_only=True)
    return float(trainer.callback_metrics.get("val/student/acc", torch.tensor(float("nan"))))


def provide_teacher(cfg: DictConfig, datamodule: L.LightningDataModule) -> tuple[nn.Module | None, dict]:
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
        path = teacher_cache_path(cfg)
        with _file_lock(path):
            if path.is_file():
                log.info("Reusing cached teacher %s", path)
                info["teacher/source"] = "cache"
            else:
                log.info(
                    "Training teacher %s (%d epochs); it will be cached at %s",
                    tcfg.name,
                    tcfg.train.epochs,
                    path,
                )
                val_acc = train_teacher(cfg, model, datamodule)
                atomic_torch_save(model.state_dict(), path)
                atomic_write_json(
                    path.with_suffix(".json"),
                    {"val_acc": val_acc, "config": OmegaConf.to_container(tcfg, resolve=True)},
                )
                info["teacher/source"] = "trained"
    else:
        path = Path(str(ckpt)).expanduser()
        info["teacher/source"] = "file"
    load_weights(model, path)
    info["teacher/ckpt"] = str(path)
    info["teacher/sha256"] = sha256_file(path)
    return model, info


@torch.no_grad()
def check_teacher(model: nn.Module, datamodule: L.LightningDataModule, min_acc: float, name: str) -> float:
    """Validation accuracy of the teacher; stop the run if it is below ``min_acc``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = model.training
    model.eval().to(device)
    correct = total = 0
    for x, y, _ in datamodule.val_dataloader():
        logits = model(x.to(device))
        if logits.shape[-1] != datamodule.num_classes:
            raise KDXError(
                f"teacher={name} outputs {logits.shape[-1]} classes but the data set has "
                f"{datamodule.num_classes}; set the teacher's num_classes to the data set's"
            )
        correct += int((logits.argmax(-1).cpu() == y).sum())
        total += y.numel()
    model.train(was_training).cpu()
    acc = correct / max(total, 1)
    if acc < min_acc:
        raise KDXError(
            f"teacher={name} has validation accuracy {acc:.4f} < teacher.min_acc={min_acc}; "
            "train it longer (teacher.train.epochs), pass a better teacher.ckpt, or lower teacher.min_acc"
        )
    return acc
