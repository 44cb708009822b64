"""What identifies a teacher's weights and the data they were trained and cached on.

Data are named by their content where the data module declares it (file-based data:
:meth:`kdx.data.base.KDDataModule.data_fingerprint`), by their config otherwise (generated data);
never by the folder they are read from."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdx.data.base import KDDataModule
from kdx.utils import file_sha256, stable_hash

DATA_KEY_EXCLUDED = ("num_workers", "pin_memory", "cache_dir", "root", "eval_batch_size")
"""Data-module arguments that say where or how fast the data is read, not what it is: left out of
every key that names data (the auto-teacher's key here, the teacher-output cache's key in
:mod:`kdx.pipeline.build`), so moving the data or reading it faster reuses what is cached."""


def data_fingerprint(dataset: DictConfig) -> str | None:
    """The content digest of a ``dataset`` node's data (:meth:`kdx.data.base.KDDataModule.data_fingerprint`);
    ``None`` for a data module identified by its config (the data module is only built, never set
    up, and only when its class declares a fingerprint)."""
    node = dataset.get("datamodule")
    target = node.get("_target_") if node is not None else None
    if not target:
        return None
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - an unknown target is the builder's error to report
        return None
    if not (isinstance(cls, type) and issubclass(cls, KDDataModule)):
        return None
    if cls.data_fingerprint is KDDataModule.data_fingerprint:
        return None
    return instantiate(node).data_fingerprint()


def portable(value: Any, cache_dir: str | None) -> Any:
    """``value`` with every path inside the cache folder (a tokenizer that kdx trained and cached)
    written relative to it and followed by a digest of its files: a key must not change when the
    cache folder is moved, and must change when the tokenizer was trained again (WordPiece breaks
    ties between equally frequent pieces in no fixed order, so a retrained one may number its
    pieces differently)."""
    if cache_dir is None:
        return value
    prefix = str(Path(str(cache_dir)).expanduser().resolve())
    if isinstance(value, dict):
        return {k: portable(v, cache_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, cache_dir) for v in value]
    if (
        isinstance(value, str)
        and value.startswith("/")
        and str(Path(value).resolve()).startswith(prefix + "/")
    ):
        path = Path(value).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        digest = stable_hash([(str(f.relative_to(path.parent)), file_sha256(f)) for f in files], length=16)
        return "${paths.cache_dir}/" + str(path)[len(prefix) + 1 :] + "#" + digest
    return value


def teacher_dataset(cfg: DictConfig) -> DictConfig:
    """The data the auto-teacher trains on: ``cfg.dataset`` with the recipe's ``teacher.train.dataset``
    merged over it (e.g. ``{datamodule: {max_train_samples: null}}``: the teacher learns from the
    whole training split while the student's runs use a labelled budget)."""
    override = OmegaConf.select(cfg, "teacher.train.dataset")
    if not override:
        return cfg.dataset
    return OmegaConf.merge(cfg.dataset, override)


def data_key(cfg: DictConfig, dataset: DictConfig | None = None) -> dict[str, Any]:
    """``dataset`` (default ``cfg.dataset``) resolved, without the arguments of
    :data:`DATA_KEY_EXCLUDED`; data with a content fingerprint are named by it (``content``), not by
    their folder (``root``)."""
    node = cfg.dataset if dataset is None else dataset
    dataset = OmegaConf.to_container(node, resolve=True)
    datamodule = {
        k: v for k, v in (dataset.pop("datamodule", None) or {}).items() if k not in DATA_KEY_EXCLUDED
    }
    fingerprint = data_fingerprint(node)
    if fingerprint is not None:
        dataset.pop("root", None)
        dataset["content"] = fingerprint
    return portable({**dataset, "datamodule": datamodule}, _cache_dir(cfg))


def _cache_dir(cfg: DictConfig) -> str | None:
    return OmegaConf.select(cfg, "paths.cache_dir", default=None)


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
        "model": portable(OmegaConf.to_container(cfg.teacher.model, resolve=True), _cache_dir(cfg)),
        "model_code": model_code_fingerprint(model),
        "recipe": {
            k: v for k, v in OmegaConf.to_container(cfg.teacher.train, resolve=True).items() if k != "dataset"
        },
        "dataset": data_key(cfg, teacher_dataset(cfg)),
    }


def cached_teacher_path(cfg: DictConfig, model: nn.Module | None = None) -> Path:
    """Where ``teacher.ckpt=auto`` keeps the weights of ``cfg``'s teacher (``model``: its instance,
    built from ``cfg.teacher.model`` when not given)."""
    model = instantiate(cfg.teacher.model) if model is None else model
    key = stable_hash(teacher_key(cfg, model))
    return Path(cfg.paths.cache_dir) / "teachers" / f"{cfg.teacher.name}-{key}.pt"
