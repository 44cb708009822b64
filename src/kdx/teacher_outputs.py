"""Teacher-output cache (``teacher.cache=off|exact|views|topk``): skip the frozen teacher's forward pass.

A frozen teacher in ``eval()`` maps the same input to the same outputs every time, so a training step
can read them instead of computing them, provided the input really is the same. Two modes:

* ``exact``: for data whose training view of an example is deterministic (MNIST-1D, digits,
  synthetic, text, CIFAR with ``augment=false``). The outputs the method ``reads`` (logits,
  embedding, stages, pre-activation stages) are stored once per training example, by its ``index``, in memory-mapped
  ``.npy`` files. A data set whose training items change from one read to the next is refused.
* ``views``: for random augmentation (CIFAR's RandomCrop(32, padding=4) + horizontal flip). Each
  example gets a fixed number of augmented views (``teacher.cache_views``) whose augmentation
  parameters are drawn from ``(seed, index, view)`` and replayed exactly (:mod:`kdx.data.replay`);
  the teacher's outputs are stored per view, and the data module trains on the same views
  (``KDDataModule.train_on_views``). In epoch ``e`` example ``i`` is shown as view
  ``view_of(seed, e, i)``. What this changes: the student sees ``V`` distinct augmentations of each
  example instead of a fresh one every epoch (docs/performance.md). ``teacher.cache_topk=k`` keeps only the top-k logits per row (many
  classes); the KL this adds at T = 1 is measured during filling and reported.

Filling is a pre-pass over the training set at fit start (in the training set's order, under the
run's precision), after which no training step runs the teacher. The files live in
``<cache_dir>/teacher_outputs/<teacher>-<key>/``; the key hashes the teacher's weights, the data set
config, the training transform (or the view recipe), what the method reads, the precision and the
memory format. A file lock makes concurrent jobs (multirun, DDP ranks) fill a key once; the folder
is filled under a temporary name (``.<name>.<random>.tmp``) and renamed, so present means complete and a
reader never sees a half-written cache. Under DDP each rank reads the rows of its own batches.

Nothing read is trusted: ``meta.json`` records every file's size and sha256 and every array's shape
and dtype, and each run checks them before reading (about 0.8 s per GB of cache on one core). An
entry that fails (bytes overwritten, truncated, record missing or garbage) is moved aside to
``<name>.bad-<time>`` with the reason logged once, and filled again; the temporary folder of a fill
that was killed is removed on the next use (no live process holds its lock). In a read-only cache
folder without this run's outputs the teacher runs live, with one warning (``status == "live"``).

Step path: ``DistillationModule.on_before_batch_transfer`` reads the batch's rows on the host
(the index is still a CPU tensor there: no device sync), ``on_after_batch_transfer`` moves them with
the batch, and ``DistillationMethod.teacher_forward`` returns them through ``host.cached_teacher(x)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdx.data.base import KDDataModule
from kdx.data.replay import ViewReplayDataset, view_of
from kdx.errors import KDXError
from kdx.models.base import EMBEDDING, LOGITS, PREACT_STAGES, STAGES, ModelOutput
from kdx.utils import (
    atomic_write_json,
    check_file,
    clean_stale_temps,
    file_record,
    is_writable,
    json_safe,
    lock_path,
    move_aside,
    stable_hash,
    temp_path,
)

log = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.int32: np.int32, torch.int16: np.int16, torch.float16: np.float16}
CACHE_MODES = ("off", "exact", "views", "auto", "topk")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The cache


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's weights and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def _is_deterministic(dataset: Dataset, probes: int = 3) -> bool:
    """Whether reading an item twice gives the same input (no random augmentation)."""
    n = len(dataset)  # type: ignore[arg-type]
    for i in sorted({0, n // 2, n - 1})[:probes]:
        a, b = dataset[i][0], dataset[i][0]
        if isinstance(a, Tensor) and not torch.equal(a, b):
            return False
        if isinstance(a, dict) and any(
            not torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a
        ):
            return False
    return True


def topk_reconstruct(values: Tensor, indices: Tensor, lse: Tensor, num_classes: int) -> Tensor:
    """Full logits from the top-k logits and the row's logsumexp: the top-k keep their probabilities
    at T = 1; the remaining mass is spread evenly over the other classes."""
    rows = values.shape[0]
    log_top = values - lse.unsqueeze(1)
    rest_mass = (1 - log_top.exp().sum(1)).clamp_min(1e-12)
    others = max(1, num_classes - values.shape[1])
    fill = (torch.log(rest_mass / others) + lse).unsqueeze(1)
    logits = fill.expand(rows, num_classes).clone()
    return logits.scatter_(1, indices.long(), values)


@dataclass
class TopKTarget:
    """A sparse next-token target: per position the top-k log-probs ``logp`` (…, k), their token ``ids``
    (…, k) and ``rest`` (…), the log of the probability of every other token together (−inf when k
    covers the vocabulary)."""

    logp: Tensor
    ids: Tensor
    rest: Tensor


def topk_target(logits: Tensor, k: int) -> TopKTarget:
    """The top-k target of ``logits`` (…, V) at T = 1, in float32 (the cache stores it in float16)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    values, ids = log_p.topk(min(int(k), log_p.shape[-1]), dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
    return TopKTarget(values, ids, rest)


def topk_log_probs(target: TopKTarget, vocab: int) -> Tensor:
    """Full log-probs (…, V) from a top-k target: the k tokens keep theirs, the rest's mass is spread
    evenly over the other ``V − k`` tokens (and renormalised, as float16 rounding may leave a sum ≠ 1)."""
    logp, ids, rest = target.logp.float(), target.ids.long(), target.rest.float()
    others = max(1, vocab - logp.shape[-1])
    fill = (rest - math.log(others)).unsqueeze(-1).expand(*logp.shape[:-1], vocab).clone()
    full = fill.scatter(-1, ids, logp)
    return torch.log_softmax(full, dim=-1)


def topk_bytes_per_token(k: int, vocab: int) -> int:
    """Bytes the cache stores per position: k float16 log-probs, k ids, one float16 rest."""
    return int(k) * (2 + (2 if vocab <= np.iinfo(np.int16).max else 4)) + 2


class TeacherOutputCache:
    """The cache of one run; built by :func:`kdx.factory.build_module` from ``cfg.teacher.cache*``."""

    def __init__(
        self,
        mode: str,
        cache_dir: str | os.PathLike,
        key_fields: dict[str, Any],
        seed: int = 0,
        views: int = 4,
        topk: int | None = None,
        batch_size: int = 256,
    ):
        if mode not in CACHE_MODES:
            raise KDXError(f"teacher.cache={mode!r} is not one of {', '.join(CACHE_MODES)}")
        if mode == "views" and int(views) < 1:
            raise KDXError(f"teacher.cache_views={views} must be >= 1")
        if topk is not None and int(topk) < 1:
            raise KDXError(f"teacher.cache_topk={topk} must be >= 1 (or null: all logits)")
        if mode == "topk" and topk is None:
            raise KDXError(
                "teacher.cache=topk needs teacher.cache_topk=<k>, the log-probs kept per position (e.g. 32)"
            )
        self.mode, self.cache_dir, self.key_fields = mode, Path(cache_dir), dict(key_fields)
        self.seed, self.views = int(seed), int(views) if mode == "views" else 1
        self._views_asked = int(views)
        self.topk, self.batch_size = (None if topk is None else int(topk)), int(batch_size)
        self.path: Path | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.stage_count = self.preact_count = 0
        self.num_classes = 0
        self.info: dict[str, Any] = {}
        self._datamodule: KDDataModule | None = None
        self.status = ""
        """What :meth:`prepare` did: ``"filled"`` (a new entry), ``"reused"`` (an entry that passed its
        checks), ``"rebuilt"`` (one failed them: moved aside, filled again; ``problem`` says why) or
        ``"live"`` (a read-only cache without this run's outputs: the teacher runs in every step).
        The pipeline records it (``teacher_cache/status``)."""
        self.problem: str | None = None
        """Why the entry was rebuilt, or why the teacher runs live; None when nothing was wrong."""

    @property
    def active(self) -> bool:
        return self.mode != "off"

    # -- checks and key ----------------------------------------------------------------------
    @staticmethod
    def usable_by(method: Any) -> bool:
        return method.teacher_use.cacheable

    @staticmethod
    def check_method(method: Any) -> None:
        if not method.teacher_use.cacheable:
            why = method.live_reason
            raise KDXError(
                f"method={method.name} cannot train from cached teacher outputs: {why}; "
                "set teacher.cache=off for this method"
            )

    def _train_source(
        self, datamodule: KDDataModule
    ) -> tuple[Dataset, dict[str, Any], ViewReplayDataset | None]:
        """The training items the cache is built over, what describes their transform, and (views)
        the stored views the training loader replays."""
        train_set = datamodule.train_set
        if train_set is None:
            train_set = datamodule.train_dataloader().dataset
        if self.mode == "auto":  # views where the data replays its augmentation, else exact
            if datamodule.augment and datamodule.replayable_views() is not None:
                self.mode, self.views = "views", self._views_asked
            elif _is_deterministic(train_set):
                self.mode = "exact"
            else:  # random augmentation that kdx cannot replay (ImageNet's): the live teacher
                self.mode = "off"
            log.info("teacher.cache=auto: %s mode for %s", self.mode, type(datamodule).__name__)
            if self.mode == "off":
                return train_set, {}, None
        if self.mode in ("exact", "topk"):
            if datamodule.augment or not _is_deterministic(train_set):
                raise KDXError(
                    f"teacher.cache=exact needs a deterministic training view, but {type(datamodule).__name__}'s "
                    "training items change from one read to the next (random augmentation); use "
                    "teacher.cache=views (fixed augmented views per example) or teacher.cache=off"
                )
            transform = getattr(getattr(train_set, "base", None), "transform", None)
            return train_set, {"transform": repr(transform) if transform is not None else None}, None
        source = datamodule.replayable_views()
        if source is None and not datamodule.augment:
            raise KDXError(
                f"teacher.cache=views replays random augmentation, but {type(datamodule).__name__} has "
                "augment=false (a deterministic training view): use teacher.cache=exact"
            )
        if source is None:
            raise KDXError(
                f"teacher.cache=views replays a data set's augmentation, and {type(datamodule).__name__} "
                "has none to replay (no replayable_views()); use teacher.cache=exact for deterministic data"
            )
        base, indices, replay = source
        views = ViewReplayDataset(base, indices, replay, self.views, self.seed)
        return views, replay.describe(), views

    # -- filling -----------------------------------------------------------------------------
    def bind(self, datamodule: KDDataModule) -> None:
        """Check the training data and, in view mode, have the data module train on the stored views.

        Called from the module's ``setup("fit")``: before Lightning first builds the training loader
        (a scheduler's horizon may ask for it before ``on_fit_start``)."""
        self._datamodule = datamodule
        self._dataset, self._transform, views = self._train_source(datamodule)
        if views is not None:
            datamodule.train_on_views(views)

    def prepare(
        self,
        teacher: torch.nn.Module,
        reads: frozenset[str],
        datamodule: KDDataModule | None = None,
        forward_context=None,
    ) -> None:
        """Open the cache for this run, filling it first if no job has (under a file lock); binds
        ``datamodule`` first unless :meth:`bind` did."""
        if datamodule is not None and self._datamodule is not datamodule:
            self.bind(datamodule)
        dataset, transform = self._dataset, self._transform
        key = {
            **self.key_fields,
            "format": FORMAT_VERSION,
            "teacher_weights": state_dict_sha256(teacher),
            "reads": sorted(reads),
            "mode": self.mode,
            "views": self.views,
            "seed": self.seed if self.mode == "views" else None,
            "topk": self.topk,
            "examples": len(dataset) // self.views,  # type: ignore[arg-type]
            "train_transform": transform,
        }
        name = f"{self.key_fields.get('teacher', 'teacher')}-{stable_hash(key)}"
        self.path = self.cache_dir / "teacher_outputs" / name
        parent = self.path.parent
        arrays, problem = self._verify(key)
        if arrays is None and not is_writable(parent):
            # nothing can be filled, repaired or locked here: the teacher runs live
            self.status, self.problem = "live", problem or "holds no outputs for this run"
            log.warning(
                "teacher.cache=%s: %s %s, and %s is read-only: the teacher runs live in this run "
                "(make the folder writable, or point paths.cache_dir to a writable one, to cache)",
                self.mode,
                self.path,
                self.problem,
                parent,
            )
            return
        if arrays is not None:
            self.status = "reused"
        else:
            with FileLock(str(lock_path(self.path))):
                for stale in clean_stale_temps(parent, held=self.path):
                    log.warning("teacher.cache: removed %s, left by a fill that was killed", stale)
                arrays, problem = self._verify(key)  # another job may have filled or repaired it
                if arrays is None:
                    if problem is not None:
                        bad = move_aside(self.path, problem)
                        self.problem = problem
                        log.warning(
                            "teacher.cache: %s %s: moved aside to %s; filling it again",
                            self.path,
                            problem,
                            bad.name,
                        )
                    self._fill(teacher, reads, dataset, key, forward_context)
                    arrays, problem = self._verify(key)
                    if arrays is None:  # just written: a failing check here is a bug or a failing disk
                        raise RuntimeError(
                            f"teacher.cache: {self.path} fails its check right after filling: {problem}"
                        )
                    self.status = "rebuilt" if self.problem else "filled"
                else:
                    self.status = "reused"
        for stale in clean_stale_temps(parent):  # other keys' temporaries whose fill was killed
            log.warning("teacher.cache: removed %s, left by a fill that was killed", stale)
        self._use(arrays)
        log.info("Teacher outputs cached in %s (%s, %s)", self.path, self.mode, self.status)

    @torch.no_grad()
    def _fill(self, teacher, reads, dataset, key, forward_context) -> None:
        assert self.path is not None
        tmp = temp_path(self.path, folder=True)  # follows the umask: a cache shared between users
        try:
            device = next(teacher.parameters()).device
            was_training = teacher.training
            teacher.eval()
            collate = self._datamodule.collate_fn if self._datamodule is not None else None
            loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate)
            n = len(dataset) // self.views  # type: ignore[arg-type]
            arrays: dict[str, np.ndarray] = {}
            row = 0
            topk_kl_sum = 0.0
            positions = 0
            for batch in loader:
                x = batch[0]
                x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
                context = (
                    forward_context() if forward_context is not None else torch.autocast("cpu", enabled=False)
                )
                with context:
                    out = teacher(x, reads)
                parts = self._parts(out, reads)
                if self.mode == "topk":
                    logits = parts.pop(LOGITS)
                    self.num_classes = vocab = logits.shape[-1]
                    target = topk_target(logits, self.topk)
                    stored = TopKTarget(target.logp.half(), target.ids, target.rest.half())
                    # what reading back costs: KL(full teacher ‖ reconstruction from the stored target)
                    p = torch.log_softmax(logits.float(), -1)
                    kl = (p.exp() * (p - topk_log_probs(stored, vocab))).sum(-1)
                    topk_kl_sum += float(kl.sum())
                    positions += kl.numel()
                    id_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max else torch.int32
                    parts = {
                        "topk_logp": stored.logp,
                        "topk_ids": stored.ids.to(id_dtype),
                        "topk_rest": stored.rest,
                    }
                elif LOGITS in parts and self.topk is not None:
                    logits = parts.pop(LOGITS)
                    values, indices = logits.topk(min(self.topk, logits.shape[1]), dim=1)
                    lse = torch.logsumexp(logits, dim=1)
                    approx = topk_reconstruct(values, indices, lse, logits.shape[1])
                    p = torch.log_softmax(logits, 1)
                    topk_kl_sum += float((p.exp() * (p - torch.log_softmax(approx, 1))).sum())
                    parts.update({"topk_values": values, "topk_indices": indices.int(), "logsumexp": lse})
                    self.num_classes = logits.shape[1]
                rows = next(iter(parts.values())).shape[0]
                for part, value in parts.items():
                    if part not in arrays:
                        shape = (n, self.views, *value.shape[1:])
                        dtype = _NUMPY_DTYPES.get(value.dtype, np.float32)
                        arrays[part] = np.lib.format.open_memmap(tmp / f"{part}.npy", "w+", dtype, shape)
                    flat = arrays[part].reshape(n * self.views, *value.shape[1:])
                    flat[row : row + rows] = value.cpu().numpy()
                row += rows
            for array in arrays.values():
                array.flush()
            teacher.train(was_training)
            info = {
                "key": key,
                "parts": sorted(arrays),
                "num_classes": self.num_classes,
                "stages": sum(1 for p in arrays if p.startswith("stage")),
                "preact_stages": sum(1 for p in arrays if p.startswith("preact")),
                "topk_kl_mean": topk_kl_sum / max(1, positions if self.mode == "topk" else row)
                if self.topk is not None
                else None,
                "bytes_per_token": topk_bytes_per_token(self.topk, self.num_classes)
                if self.mode == "topk"
                else None,
                # what reuse checks: every file's size and sha256, every array's shape and dtype
                "files": {f"{part}.npy": file_record(tmp / f"{part}.npy") for part in arrays},
                "arrays": {
                    part: {"shape": list(a.shape), "dtype": str(a.dtype)} for part, a in arrays.items()
                },
            }
            atomic_write_json(tmp / "meta.json", info)
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _parts(out: ModelOutput, reads: frozenset[str]) -> dict[str, Tensor]:
        parts = {LOGITS: out.logits.float()}
        if EMBEDDING in reads and out.embedding is not None:
            parts[EMBEDDING] = out.embedding.float()
        if STAGES in reads:
            parts.update({f"stage{i}": s.float() for i, s in enumerate(out.stages)})
        if PREACT_STAGES in reads:
            parts.update({f"preact{i}": s.float() for i, s in enumerate(out.preact_stages)})
        return parts

    def _verify(self, key: dict[str, Any]) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """``(arrays, None)`` when the entry at ``self.path`` passes every check (record readable and
        of this key, every file's size and sha256, every array's shape and dtype), ``(None, why)``
        when it fails, ``(None, None)`` when there is none."""
        assert self.path is not None
        if not self.path.exists():
            return None, None
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            return None, "has no meta.json (its record; a fill was interrupted, or it was deleted)"
        try:
            info = json.loads(meta_file.read_text())
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as error:
            return None, f"has an unreadable meta.json ({type(error).__name__}: {error})"
        if info.get("key") != json.loads(json.dumps(json_safe(key), sort_keys=True, default=str)):
            return None, "has a meta.json written for other outputs (its key differs)"
        files, shapes = info.get("files"), info.get("arrays")
        parts = info.get("parts")
        if not isinstance(files, dict) or not isinstance(shapes, dict) or not isinstance(parts, list):
            return None, "has a meta.json without checksums (written by an older kdx)"
        arrays = {}
        for part in parts:
            problem = check_file(self.path / f"{part}.npy", files.get(f"{part}.npy"))
            if problem is not None:
                return None, problem
            try:
                array = np.load(self.path / f"{part}.npy", mmap_mode="r")
            except (ValueError, OSError) as error:
                return None, f"{part}.npy cannot be read ({error})"
            if {"shape": list(array.shape), "dtype": str(array.dtype)} != shapes.get(part):
                return (
                    None,
                    f"{part}.npy has shape {tuple(array.shape)} {array.dtype}, its record {shapes.get(part)}",
                )
            arrays[part] = array
        self.info = info
        return arrays, None

    def _use(self, arrays: dict[str, np.ndarray] | None) -> None:
        assert arrays is not None
        self.arrays = arrays
        self.stage_count = int(self.info["stages"])
        self.preact_count = int(self.info.get("preact_stages", 0))
        self.num_classes = int(self.info.get("num_classes") or 0)

    # -- reading -----------------------------------------------------------------------------
    def read(self, index: Tensor, epoch: int) -> dict[str, Tensor] | None:
        """The rows of a batch (``index`` on the host), as CPU tensors; None when the teacher runs
        live (a read-only cache without this run's outputs: ``status == "live"``)."""
        if self.status == "live":
            return None
        rows = index.numpy()
        view = view_of(self.seed, epoch, rows, self.views) if self.views > 1 else np.zeros_like(rows)
        return {
            part: torch.from_numpy(np.ascontiguousarray(a[rows, view])) for part, a in self.arrays.items()
        }

    def output(self, parts: dict[str, Tensor]) -> ModelOutput:
        if "topk_ids" in parts:  # teacher.cache=topk: a sparse target, no logits
            return ModelOutput(
                None, topk=TopKTarget(parts["topk_logp"], parts["topk_ids"], parts["topk_rest"])
            )  # type: ignore[arg-type]
        if "topk_values" in parts:
            logits = topk_reconstruct(
                parts["topk_values"], parts["topk_indices"], parts["logsumexp"], self.num_classes
            )
        else:
            logits = parts[LOGITS]
        stages = [parts[f"stage{i}"] for i in range(self.stage_count)]
        preact = [parts[f"preact{i}"] for i in range(self.preact_count)]
        return ModelOutput(logits, parts.get(EMBEDDING), stages, preact)
