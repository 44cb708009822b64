"""What the text data modules share: tokenised splits, the text batch, padding, caches, tokenizers.

A text batch is ``(x, y, index)`` with ``x`` a dict of ``(B, L)`` tensors: ``input_ids``,
``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them) in the student's
tokenisation, plus the same keys prefixed ``teacher.`` in the teacher's tokenisation when the
teacher has a different tokenizer (see :mod:`kdx.models.hf` for how each model picks its keys).
Splits are stored padded to ``max_length``; ``trim_padding`` (the loaders' collate function) cuts
each batch to its longest row, so short sentences cost short sequences; the training loader
groups examples of similar length into batches (``length_grouping``, on by default) and the
evaluation loaders read each split shortest first, so a batch costs what its tokens cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from kdx.data.base import KDDataModule
from kdx.data.cache import load_or_build
from kdx.data.sampling import EpochSeededSampler, LengthGroupedBatchSampler, ResumableLoader
from kdx.errors import KDXError
from kdx.utils import stable_hash

TEACHER_PREFIX = "teacher."  # the same constant as kdx.models.hf.TEACHER_PREFIX (kept import-free)
TRAIN_TOKENIZER = "train"
"""``model.tokenizer=train``: the tokenizer a data set trains on its training split (a text data
module that can, declares ``trained_tokenizer()``: :mod:`kdx.data.glue`)."""
_KEEP = ("input_ids", "attention_mask", "token_type_ids")
_FORMAT = 1  # bump when the cached encodings' layout changes


class TextDataset(Dataset):
    """Tokenised examples: ``encodings[key]`` is ``(N, max_length)``; items are ``(x, y, index)``."""

    def __init__(self, encodings: dict[str, Tensor], labels: Tensor):
        lengths = {k: v.shape[0] for k, v in encodings.items()}
        if any(n != labels.shape[0] for n in lengths.values()):
            raise ValueError(f"encodings {lengths} and {labels.shape[0]} labels differ in length")
        self.encodings = encodings
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int):
        return {k: v[index] for k, v in self.encodings.items()}, self.labels[index], index

    @property
    def targets(self) -> Tensor:
        return self.labels

    @property
    def lengths(self) -> Tensor:
        """Each example's length in tokens: its longest tokenisation (what its batch is trimmed to)."""
        masks = [v for k, v in self.encodings.items() if k.endswith("attention_mask")]
        return torch.stack([m.sum(1) for m in masks]).amax(0).long()


def text_lengths(dataset: Dataset) -> Tensor:
    """The length of every item of a :class:`TextDataset` (or a ``Subset`` of one), in index order."""
    if isinstance(dataset, TextDataset):
        return dataset.lengths
    if isinstance(dataset, Subset):
        return text_lengths(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    masks = [
        [v for k, v in dataset[i][0].items() if k.endswith("attention_mask")] for i in range(len(dataset))
    ]  # type: ignore[arg-type]
    return torch.tensor([max(int(m.sum()) for m in row) for row in masks], dtype=torch.long)


def trim_padding(samples: list) -> Any:
    """Default collate, then cut every tokenisation to the longest row of the batch (right padding)."""
    x, y, index = default_collate(samples)
    for prefix in {k[: -len("attention_mask")] for k in x if k.endswith("attention_mask")}:
        length = max(1, int(x[prefix + "attention_mask"].sum(1).max()))
        for key in _KEEP:
            if prefix + key in x:
                x[prefix + key] = x[prefix + key][:, :length]
    return x, y, index


def encode(tokenizer: Any, first: Sequence[str], second: Sequence[str] | None, max_length: int) -> dict:
    """Token ids, padded to ``max_length`` and truncated, of single sentences or sentence pairs."""
    encoded = tokenizer(
        list(first),
        None if second is None else list(second),
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return {k: encoded[k].to(torch.int32 if k == "input_ids" else torch.int8) for k in _KEEP if k in encoded}


def widen(encodings: dict[str, Tensor]) -> dict[str, Tensor]:
    """The stored (compact) integer types back to what the models take (``long``)."""
    return {k: v.long() for k, v in encodings.items()}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the token ids (vocabulary, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(
    path: Path, build: Callable[[], dict], what: str = "tokenised text", companions: Sequence[Path] = ()
) -> dict:
    """``build()``'s tensors, saved at ``path`` the first time and loaded (weights_only) afterwards,
    checked against their record each time (:func:`kdx.data.cache.load_or_build`)."""
    return load_or_build(path, build, what=what, companions=companions)


def train_wordpiece(texts: Sequence[str], vocab_size: int, out_dir: str | Path) -> Any:
    """Train a BERT-style (lower-cased WordPiece, [CLS] … [SEP]) tokenizer on ``texts`` and save it.

    Returns a ``transformers.PreTrainedTokenizerFast`` that ``AutoTokenizer.from_pretrained(out_dir)``
    loads again. Used for the synthetic-text language and for tests' stand-in checkpoints.
    """
    # tokenizers and transformers on use: optional (the text extra)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(str(out_dir))
    return fast


class TextDataModule(KDDataModule):
    """A data module of :class:`TextDataset` splits; ``input_shape`` is ``(max_length,)``.

    Besides the data protocol, a text data module declares how its splits are tokenised.
    """

    input_kind = "tokens"  # batches are dicts of token ids: only text models read them

    max_length: int
    """The length every split is padded (and truncated) to; batches are trimmed to their longest row."""

    tokenizers: dict[str, str]
    """Tokenizer folder per key prefix of the batch's ``x``: ``""`` the student's tokenisation,
    ``"teacher."`` the teacher's when it differs (:data:`TEACHER_PREFIX`)."""

    trains_tokenizer: bool = False
    """Whether ``model.tokenizer=train`` can name a tokenizer trained on this data's training split
    (:meth:`trained_tokenizer`); the builder completes the models' configs with it
    (:func:`kdx.pipeline.build.resolve_tokenizers`)."""

    def trained_tokenizer(self, create: bool = True) -> Path:
        """The folder of the tokenizer trained on the training split, trained and cached on first
        use (``create=False``: an error when it is not cached). Only where :attr:`trains_tokenizer`."""
        raise KDXError(
            f"dataset={self.name} does not train a tokenizer (dataset=glue does); give the model a tokenizer folder"
        )

    length_grouping: bool
    """Whether training batches group examples of similar length (:class:`LengthGroupedBatchSampler`);
    ``False``: plain shuffled batches. Either way the order is a function of (run seed, epoch) and a
    mid-epoch resume continues with the batches the epoch had left."""

    def __init__(self, max_length: int = 128, length_grouping: bool = True, **loader_kwargs: Any):
        super().__init__(**loader_kwargs)
        if max_length < 2:
            raise KDXError(f"dataset.datamodule.max_length={max_length} must be >= 2 ([CLS] and [SEP])")
        self.max_length = max_length
        self.input_shape = (max_length,)
        self.collate_fn = trim_padding
        self.tokenizers = {}
        self.length_grouping = bool(length_grouping)
        self.batching = "length_grouped" if self.length_grouping else "shuffled"

    # -- loaders: the training batches grouped by length, the evaluation splits shortest first ------
    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if not train:  # train_eval: the training split in index order, as the base gives it
            return super()._loader(dataset, train)
        dataset = self._built(dataset)
        seed = torch.initial_seed()  # the run's seed (seed_everything runs before the data module is built)
        batches = LengthGroupedBatchSampler(
            EpochSeededSampler(len(dataset), seed),  # type: ignore[arg-type]
            self.batch_size,
            self.drop_last,
            lengths=text_lengths(dataset) if self.length_grouping else None,
            seed=seed,
            group=self.length_grouping,
        )
        return ResumableLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def _by_length(self, dataset: Dataset | None) -> DataLoader:
        # metrics do not depend on the order; sorted, each batch pads to little more than its rows
        dataset = self._built(dataset)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=torch.argsort(text_lengths(dataset), stable=True).tolist(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def val_dataloader(self) -> DataLoader:
        return self._by_length(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._by_length(self.test_set)

    @staticmethod
    def cache_key(*parts: Any) -> str:
        return stable_hash([_FORMAT, *parts], length=16)
