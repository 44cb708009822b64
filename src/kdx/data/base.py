"""The data protocol: what every kdx data module declares, and the rest of kdx reads.

A data module subclasses :class:`KDDataModule`, sets ``num_classes`` and ``input_shape`` and
builds ``self.train_set`` / ``self.val_set`` / ``self.test_set`` in ``setup``; batches are
``(x, y, index)``, and the loaders and the index wrapping live here once. Everything kdx reads from a
data module (methods, diagnostics, evaluation, the teacher-output cache) is declared on
:class:`KDDataModule` with its default, so a data module that does not need a feature inherits a
default that says so (``augment = False``, ``replayable_views() -> None``...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdx.data.replay import ReplayableViews, ViewReplayDataset
from kdx.data.sampling import EpochSeededSampler, ViewSampler

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test", "train_eval"]
SPLITS: tuple[str, ...] = get_args(Split)
InputKind = Literal["dense", "tokens", "lm"]
INPUT_KINDS: tuple[str, ...] = get_args(InputKind)


def dataset_targets(dataset: Dataset) -> Tensor:
    """The label of every item of ``dataset``, in index order, as a CPU ``long`` tensor.

    Read from the arrays the dataset wraps where it has them (``TensorDataset``, ``Subset``,
    torchvision's ``targets``, kdx's wrappers' ``targets``), so no image is decoded; else by
    reading every item.
    """
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long().cpu()
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long).cpu()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(x, y)`` so that each item is ``(x, y, index)``."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index][:2]
        return x, y, index

    @property
    def targets(self) -> Tensor:
        return dataset_targets(self.base)


def tensor_dataset(x: Tensor, y: Tensor) -> IndexedDataset:
    return IndexedDataset(TensorDataset(x, y.long()))


class KDDataModule(L.LightningDataModule):
    """Base of every kdx data module: the declared data protocol.

    Subclasses set the class attributes (or assign them in ``__init__`` when they depend on
    arguments) and build the three splits in ``setup``; they override a method below only to
    change what it returns (e.g. an un-augmented ``train_eval_dataloader``).
    """

    num_classes: int
    """Number of classes; labels lie in ``0 .. num_classes - 1``. Every data module sets it."""

    input_shape: tuple[int, ...] | None = None
    """Shape of one input without the batch dimension (``(C, H, W)``, ``(C, L)``, text: ``(max_length,)``),
    which methods probe the models with; None when the data module has no fixed input shape."""

    name: str = "dataset"
    """The data set's name, as in ``dataset=<name>``."""

    input_kind: InputKind = "dense"
    """What a batch's ``x`` is: ``"dense"``, a float tensor of ``input_shape`` (signals, images), or
    ``"tokens"``, a dict of ``(B, L)`` integer tensors (``input_ids``, ``attention_mask``...; the text
    data modules, :mod:`kdx.data.text`), or ``"lm"``, the same mapping of packed next-token blocks whose
    ``y`` is the next token of every position (:mod:`kdx.data.lm`; causal language models). Only a model
    made for that kind can read the batches: run validation refuses the others in one line before any work."""

    examples_read: dict[str, int]
    """How many examples ``setup`` read per split (``{"train": n, "val": n, "test": n}``; a data
    set read from files counts the rows of its files); ``{}`` before ``setup``. Logged once; the
    pipeline records it in metrics.json (``data/examples``)."""

    augment: bool = False
    """Whether the training split is randomly augmented (an item changes from one read to the next)."""

    collate_fn: Callable[[list], Any] | None = None
    """The loaders' collate function; None: PyTorch's default collate."""

    batch_size: int
    """Training batch size."""

    batching: str | None = None
    """How the training loader forms its batches when a data module chooses (text:
    ``"length_grouped"`` or ``"shuffled"``); recorded in metrics.json (``data/batching``). None:
    shuffled by (run seed, epoch), the default loader."""

    eval_batch_size: int
    """Batch size of the evaluation loaders (``val``, ``test``, ``train_eval``)."""

    num_workers: int
    """DataLoader worker processes of every loader."""

    pin_memory: bool
    """Whether the loaders pin their batches' memory."""

    drop_last: bool
    """Whether the training loader drops a last incomplete batch (evaluation loaders never do)."""

    train_set: Dataset | None
    """The training split (``None`` until ``setup``), items ``(x, y, index)``."""

    val_set: Dataset | None
    """The validation split (``None`` until ``setup``); may be the test split (CIFAR's protocol)."""

    test_set: Dataset | None
    """The test split (``None`` until ``setup``)."""

    replayed_views: ViewReplayDataset | None
    """The stored views the training loader serves instead of ``train_set`` (see :meth:`train_on_views`)."""

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.train_set = None
        self.val_set = None
        self.test_set = None
        self.replayed_views = None
        self.examples_read = {}

    def note_examples(self, counts: dict[str, int] | None = None) -> dict[str, int]:
        """Set :attr:`examples_read` (``counts``, or the lengths of the built splits) and log it once;
        every ``setup`` calls it when it has built the splits."""
        if counts is None:
            splits = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
            counts = {name: len(split) for name, split in splits.items() if split is not None}  # type: ignore[arg-type]
        counts = {name: int(n) for name, n in counts.items()}
        if counts != self.examples_read:
            self.examples_read = counts
            log.info(
                "%s: examples read per split: %s", self.name, ", ".join(f"{k} {v}" for k, v in counts.items())
            )
        return counts

    # -- loaders -------------------------------------------------------------------------------
    def _built(self, dataset: Dataset | None) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split")
        return dataset

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        dataset = self._built(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            # the run's seed (seed_everything sets it before the data module is built)
            sampler=EpochSeededSampler(len(dataset), torch.initial_seed()) if train else None,  # type: ignore[arg-type]
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,  # text data trims each batch's padding (kdx.data.text)
        )

    def train_dataloader(self) -> DataLoader:
        """The training split, shuffled by (run seed, epoch); the replayed views when
        :meth:`train_on_views` set them."""
        if self.replayed_views is not None:
            return self._views_loader(self.replayed_views)
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def train_eval_dataloader(self) -> DataLoader:
        """The training split in order, without shuffling and without random augmentation (for
        fitting PCA, class centres, evaluating on the training split...)."""
        return self._loader(self.train_set, train=False)

    def dataloader(self, split: Split) -> DataLoader:
        """The loader of ``split``: ``"train"``, ``"val"``, ``"test"`` or ``"train_eval"``."""
        loaders = {
            "train": self.train_dataloader,
            "val": self.val_dataloader,
            "test": self.test_dataloader,
            "train_eval": self.train_eval_dataloader,
        }
        if split not in loaders:
            raise ValueError(f"{type(self).__name__}: split {split!r} is not one of {', '.join(SPLITS)}")
        return loaders[split]()

    # -- labels --------------------------------------------------------------------------------
    def train_targets(self) -> Tensor:
        """The label of every training example, in index order (the ``index`` of the batches)."""
        return dataset_targets(self._built(self.train_set))

    def val_targets(self) -> Tensor:
        """The label of every validation example, in index order; its class counts say what chance
        is (:class:`kdx.callbacks.ChanceTest`)."""
        return dataset_targets(self._built(self.val_set))

    # -- view replay ---------------------------------------------------------------------------
    def replayable_views(self) -> ReplayableViews | None:
        """The training split's raw items and its augmentation in replayable form
        (:mod:`kdx.data.replay`), for ``teacher.cache=views``; None: nothing to replay (the
        training view is deterministic, or its augmentation has no replayable form)."""
        return None

    def train_on_views(self, views: ViewReplayDataset | None) -> None:
        """Train on ``views`` from now on: in epoch ``e`` the training loader shows each example
        once, in the order of the plain training loader, as view ``view_of(views.seed, e, index)``.
        ``None`` goes back to the training split."""
        self.replayed_views = views

    def _views_loader(self, views: ViewReplayDataset) -> DataLoader:
        return DataLoader(
            views,
            batch_size=self.batch_size,
            sampler=ViewSampler(views.examples, views.views, views.seed, torch.initial_seed()),
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    # -- identity ------------------------------------------------------------------------------
    def data_fingerprint(self) -> str | None:
        """A digest of the data's content (the bytes of the files it reads, and what selects from
        them), which every cache key that names the data uses instead of where the files are: a
        moved or copied folder reuses the cached teacher, teacher outputs and tokenisation. ``None``
        (the default): the data are identified by their config (generated data, whose settings
        decide every example). Cheap to call before ``setup`` (file digests are cached,
        :func:`kdx.data.cache.content_digest`)."""
        return None

    # -- ground truth --------------------------------------------------------------------------
    def true_class_similarity(self) -> Tensor | None:
        """The ``(K, K)`` similarity of the classes when the data set knows it (generated data with
        a class hierarchy); None otherwise. Diagnostics compare the models' class similarity with it."""
        return None
