"""Teacher-output cache (``teacher.cache=off|exact|views``): skip the frozen teacher's forward pass.

A frozen teacher in ``eval()`` maps the same input to the same outputs every time, so a training step
can read them instead of computing them, provided the input really is the same. Two modes:

* ``exact``: for data whose training view of an example is deterministic (MNIST-1D, digits,
  synthetic, text, CIFAR with ``augment=false``). The outputs the method ``reads`` (logits,
  embedding, stages) are stored once per training example, by its ``index``, in memory-mapped
  ``.npy`` files. A data set whose training items change from one read to the next is refused.
* ``views``: for random augmentation (CIFAR's RandomCrop(32, padding=4) + horizontal flip). Each
  example gets a fixed number of augmented views (``teacher.cache_views``) whose augmentation
  parameters are drawn from ``(seed, index, view)`` and replayed exactly; the teacher's outputs are
  stored per view. In epoch ``e`` example ``i`` is shown as view ``view_of(seed, e, i)``. What this
  changes: the student sees ``V`` distinct augmentations of each example instead of a fresh one every
  epoch (docs/performance.md). ``teacher.cache_topk=k`` keeps only the top-k logits per row (many
  classes); the KL this adds at T = 1 is measured during filling and reported.

Filling is a pre-pass over the training set at fit start (in the training set's order, under the
run's precision), after which no training step runs the teacher. The files live in
``<cache_dir>/teacher_outputs/<teacher>-<key>/``; the key hashes the teacher's weights, the data set
config, the training transform (or the view recipe), what the method reads, the precision and the
memory format. A file lock makes concurrent jobs (multirun, DDP ranks) fill a key once; the folder
is filled under a temporary name and renamed, so present means complete and a reader never sees a
half-written cache. Under DDP each rank reads the rows of its own batches.

Step path: ``DistillationModule.on_before_batch_transfer`` reads the batch's rows on the host
(the index is still a CPU tensor there: no device sync), ``on_after_batch_transfer`` moves them with
the batch, and ``DistillationMethod.teacher_forward`` returns them through ``host.cached_teacher(x)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from kdx.errors import KDXError
from kdx.models.base import EMBEDDING, LOGITS, STAGES, ModelOutput
from kdx.utils import atomic_write_json, stable_hash

log = logging.getLogger(__name__)

CACHE_MODES = ("off", "exact", "views", "auto")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Reproducible draws from (seed, a, b): a SplitMix64 mix, vectorised in numpy and the same per item.

_MASK = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def mix(seed: int, a: int | np.ndarray, b: int | np.ndarray, salt: int = 0) -> np.ndarray:
    """A 64-bit hash of ``(seed, a, b, salt)``; ``a``/``b`` may be arrays (broadcast)."""
    h = _splitmix(np.asarray(seed, dtype=np.uint64) ^ np.uint64(salt))
    h = _splitmix(h ^ np.asarray(a, dtype=np.int64).astype(np.uint64))
    return _splitmix(h ^ np.asarray(b, dtype=np.int64).astype(np.uint64))


def view_of(seed: int, epoch: int, index: int | np.ndarray, views: int) -> np.ndarray:
    """Which of the ``views`` stored views example ``index`` is shown as in ``epoch``."""
    return (mix(seed, epoch, index, salt=1) % np.uint64(views)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# View replay for CIFAR's augmentation


class CropFlipReplay:
    """RandomCrop(size, padding) + horizontal flip whose parameters come from ``(seed, index, view)``.

    ``params`` gives ``(top, left, flip)``; ``__call__`` applies them to a PIL image or a ``(C, H, W)``
    uint8 tensor and normalises like :func:`kdx.data.cifar.image_transform`, so view ``v`` of
    example ``i`` is the same tensor, bit for bit, whenever it is built.
    """

    def __init__(
        self, size: int, padding: int, mean: Sequence[float], std: Sequence[float], flip: bool = True
    ):
        self.size, self.padding, self.flip = int(size), int(padding), bool(flip)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def describe(self) -> dict[str, Any]:
        return {
            "replay": "crop_flip",
            "size": self.size,
            "padding": self.padding,
            "flip": self.flip,
            "mean": self.mean,
            "std": self.std,
        }

    def params(self, seed: int, index: int, view: int) -> tuple[int, int, bool]:
        h = int(mix(seed, index, view, salt=2))
        span = 2 * self.padding + 1  # crop offsets 0 .. 2·padding in the padded image
        return (h % span, (h // span) % span, self.flip and bool((h // (span * span)) & 1))

    def __call__(self, image: Any, params: tuple[int, int, bool]) -> Tensor:
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as TF

        top, left, flip = params
        x = TF.to_image(image) if not isinstance(image, Tensor) else image
        x = TF.pad(x, [self.padding])  # zero padding, as v2.RandomCrop(padding=p)
        x = TF.crop(x, top, left, self.size, self.size)
        if flip:
            x = TF.horizontal_flip(x)
        x = v2.functional.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std)).as_subclass(Tensor)


class ViewReplayDataset(Dataset):
    """Items keyed by ``index * views + view``: ``(view `view` of example `index`, y, index)``."""

    def __init__(self, base: Dataset, indices: Sequence[int], replay: CropFlipReplay, views: int, seed: int):
        self.base, self.indices, self.replay = base, list(indices), replay
        self.views, self.seed = int(views), int(seed)

    def __len__(self) -> int:
        return len(self.indices) * self.views

    def item(self, index: int, view: int) -> tuple[Tensor, int, int]:
        image, y = self.base[self.indices[index]][:2]
        return self.replay(image, self.replay.params(self.seed, index, view)), y, index

    def __getitem__(self, key: int):
        return self.item(*divmod(int(key), self.views))


class ViewSampler(Sampler[int]):
    """The order of :class:`~kdx.data.base.EpochSeededSampler` (seed, epoch), each example as its epoch's view."""

    def __init__(self, size: int, views: int, seed: int, order_seed: int):
        self.size, self.views, self.seed, self.order_seed, self.epoch = size, views, seed, order_seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.order_seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).numpy()
        keys = order * self.views + view_of(self.seed, self.epoch, order, self.views)
        return iter(keys.tolist())

    def __len__(self) -> int:
        return self.size


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
        self.mode, self.cache_dir, self.key_fields = mode, Path(cache_dir), dict(key_fields)
        self.seed, self.views = int(seed), int(views) if mode == "views" else 1
        self._views_asked = int(views)
        self.topk, self.batch_size = (None if topk is None else int(topk)), int(batch_size)
        self.path: Path | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.stage_count = 0
        self.num_classes = 0
        self.info: dict[str, Any] = {}

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
        self, datamodule: Any
    ) -> tuple[Dataset, dict[str, Any], Callable[[], DataLoader] | None]:
        """The training items the cache is built over, what describes their transform, and (views)
        the loader that replays the stored views."""
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None:
            train_set = datamodule.train_dataloader().dataset
        if self.mode == "auto":  # views where the data replays its augmentation, else exact
            random_views = getattr(datamodule, "augment", False) and hasattr(datamodule, "replayable_views")
            if random_views:
                self.mode, self.views = "views", self._views_asked
            elif _is_deterministic(train_set):
                self.mode = "exact"
            else:  # random augmentation that kdx cannot replay (ImageNet's): the live teacher
                self.mode = "off"
            log.info("teacher.cache=auto: %s mode for %s", self.mode, type(datamodule).__name__)
            if self.mode == "off":
                return train_set, {}, None
        if self.mode == "exact":
            if getattr(datamodule, "augment", False) or not _is_deterministic(train_set):
                raise KDXError(
                    f"teacher.cache=exact needs a deterministic training view, but {type(datamodule).__name__}'s "
                    "training items change from one read to the next (random augmentation); use "
                    "teacher.cache=views (fixed augmented views per example) or teacher.cache=off"
                )
            transform = getattr(getattr(train_set, "base", None), "transform", None)
            return train_set, {"transform": repr(transform) if transform is not None else None}, None
        if getattr(datamodule, "augment", True) is False:
            raise KDXError(
                f"teacher.cache=views replays random augmentation, but {type(datamodule).__name__} has "
                "augment=false (a deterministic training view): use teacher.cache=exact"
            )
        hook = getattr(datamodule, "replayable_views", None)
        if hook is None:
            raise KDXError(
                f"teacher.cache=views replays a data set's augmentation, and {type(datamodule).__name__} "
                "has none to replay (no replayable_views()); use teacher.cache=exact for deterministic data"
            )
        base, indices, replay = hook()
        views = ViewReplayDataset(base, indices, replay, self.views, self.seed)

        def loader() -> DataLoader:
            return DataLoader(
                views,
                batch_size=datamodule.batch_size,
                sampler=ViewSampler(len(indices), self.views, self.seed, torch.initial_seed()),
                drop_last=getattr(datamodule, "drop_last", False),
                num_workers=datamodule.num_workers,
                pin_memory=datamodule.pin_memory,
                persistent_workers=datamodule.num_workers > 0,
            )

        return views, replay.describe(), loader

    # -- filling -----------------------------------------------------------------------------
    def bind(self, datamodule: Any) -> None:
        """Check the training data and, in view mode, make its training loader replay the stored views.

        Called from the module's ``setup("fit")``: before Lightning first builds the training loader
        (a scheduler's horizon may ask for it before ``on_fit_start``)."""
        self._datamodule = datamodule
        self._dataset, self._transform, replay_loader = self._train_source(datamodule)
        if self.mode == "off":
            return
        if replay_loader is not None:
            datamodule.train_dataloader = replay_loader  # the training loader replays the stored views

    def prepare(
        self, teacher: torch.nn.Module, reads: frozenset[str], datamodule: Any = None, forward_context=None
    ) -> None:
        """Open the cache for this run, filling it first if no job has (under a file lock); binds
        ``datamodule`` first unless :meth:`bind` did."""
        from filelock import FileLock

        if datamodule is not None and getattr(self, "_datamodule", None) is not datamodule:
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.path / "meta.json").is_file():
            with FileLock(str(self.path) + ".lock"):
                if not (self.path / "meta.json").is_file():
                    self._fill(teacher, reads, dataset, key, forward_context)
        self._open()
        log.info("Teacher outputs cached in %s (%s)", self.path, self.mode)

    @torch.no_grad()
    def _fill(self, teacher, reads, dataset, key, forward_context) -> None:
        assert self.path is not None
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; a cache shared between users follows the umask
        try:
            device = next(teacher.parameters()).device
            was_training = teacher.training
            teacher.eval()
            collate = getattr(getattr(self, "_datamodule", None), "collate_fn", None)
            loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate)
            n = len(dataset) // self.views  # type: ignore[arg-type]
            arrays: dict[str, np.ndarray] = {}
            row = 0
            topk_kl_sum = 0.0
            for batch in loader:
                x = batch[0]
                x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
                context = (
                    forward_context() if forward_context is not None else torch.autocast("cpu", enabled=False)
                )
                with context:
                    out = teacher(x, reads)
                parts = self._parts(out, reads)
                if LOGITS in parts and self.topk is not None:
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
                        dtype = np.int32 if value.dtype == torch.int32 else np.float32
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
                "topk_kl_mean": topk_kl_sum / max(1, row) if self.topk is not None else None,
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
        return parts

    def _open(self) -> None:
        assert self.path is not None
        self.info = json.loads((self.path / "meta.json").read_text())
        self.arrays = {part: np.load(self.path / f"{part}.npy", mmap_mode="r") for part in self.info["parts"]}
        self.stage_count = int(self.info["stages"])
        self.num_classes = int(self.info.get("num_classes") or 0)

    # -- reading -----------------------------------------------------------------------------
    def read(self, index: Tensor, epoch: int) -> dict[str, Tensor]:
        """The rows of a batch (``index`` on the host), as CPU tensors."""
        rows = index.numpy()
        view = view_of(self.seed, epoch, rows, self.views) if self.views > 1 else np.zeros_like(rows)
        return {
            part: torch.from_numpy(np.ascontiguousarray(a[rows, view])) for part, a in self.arrays.items()
        }

    def output(self, parts: dict[str, Tensor]) -> ModelOutput:
        if "topk_values" in parts:
            logits = topk_reconstruct(
                parts["topk_values"], parts["topk_indices"], parts["logsumexp"], self.num_classes
            )
        else:
            logits = parts[LOGITS]
        stages = [parts[f"stage{i}"] for i in range(self.stage_count)]
        return ModelOutput(logits, parts.get(EMBEDDING), stages)
