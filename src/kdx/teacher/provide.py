"""A run's teacher with its weights: loaded from ``teacher.ckpt=<path>`` or ``teacher.ckpt=auto``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from kdx.errors import KDXError
from kdx.models.weights import load_weights
from kdx.teacher.auto import RunFn, auto_teacher
from kdx.utils import sha256_file


def provide_teacher(cfg: DictConfig, run: RunFn | None = None) -> tuple[nn.Module | None, dict[str, Any]]:
    """Build the teacher of ``cfg.teacher`` and give it weights; ``(None, {})`` when there is none.
    ``run`` (the pipeline's) trains an auto-teacher that is not cached yet."""
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
        path = auto_teacher(cfg, model, info, run)  # verified and loaded
    else:
        path = Path(str(ckpt)).expanduser()
        info["teacher/source"] = "file"
        load_weights(model, path)
    info["teacher/ckpt"] = str(path)
    info["teacher/sha256"] = sha256_file(path)
    return model, info
