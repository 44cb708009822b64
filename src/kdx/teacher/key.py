"""What identifies a teacher's weights and the data they were trained and cached on."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdx.utils import stable_hash

DATA_KEY_EXCLUDED = ("num_workers", "pin_memory", "cache_dir", "root", "eval_batch_size")
"""Data-module arguments that say where or how fast the data is read, not what it is: left out of
every key that names data (the auto-teacher's key here, the teacher-output cache's key in
:mod:`kdx.pipeline.build`), so moving the data or reading it faster reuses what is cached."""


def data_key(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.dataset`` resolved, without the arguments of :data:`DATA_KEY_EXCLUDED`."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    datamodule = {
        k: v for k, v in (dataset.pop("datamodule", None) or {}).items() if k not in DATA_KEY_EXCLUDED
    }
    return {**dataset, "datamodule": datamodule}


def model_code_fingerprint(model: nn.Module) -> str:
    """Hash of the source file that defines ``model``'s class (a changed architecture is a new key)."""
    try:
        source = Path(inspect.getsourcefile(type(model)) or "").read_bytes()
    except (TypeError, OSError):
        source = type(model).__qualname__.encode()
    return hashlib.sha256(source).hexdigest()[:12]


def teacher_key(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """Everything that decides which weights an auto-trained teacher ends up with."""
    return {
        "model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
        "model_code": model_code_fingerprint(model),
        "recipe": OmegaConf.to_container(cfg.teacher.train, resolve=True),
        "dataset": data_key(cfg),
    }


def cached_teacher_path(cfg: DictConfig, model: nn.Module | None = None) -> Path:
    """Where ``teacher.ckpt=auto`` keeps the weights of ``cfg``'s teacher (``model``: its instance,
    built from ``cfg.teacher.model`` when not given)."""
    model = instantiate(cfg.teacher.model) if model is None else model
    key = stable_hash(teacher_key(cfg, model))
    return Path(cfg.paths.cache_dir) / "teachers" / f"{cfg.teacher.name}-{key}.pt"
