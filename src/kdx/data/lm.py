"""Language modelling (``dataset=lm``): packed blocks of next-token prediction.

Documents come from one of two sources:

* ``source=generated`` (the default, no files): the review language of :mod:`kdx.data.synthetic_text`
  (frames, negations, clauses joined by ``and``), one review per document, generated from ``seed``
  with a separate stream per split;
* ``source=<path>``: local text, one document per line of a file, or one document per ``.txt`` file of
  a folder (e.g. the sentences of GLUE SST-2: ``source=.../SST-2/train.tsv`` with ``tsv_column=sentence``).
  The documents are shuffled with ``seed`` and split into train / val / test by ``val_fraction`` and
  ``test_fraction``.

Tokenisation: the tokenizer in the folder ``tokenizer`` (a checkpoint's own, so that a pre-trained
model reads its vocabulary), or else a lower-cased WordPiece of ``vocab_size`` tokens trained on the
training documents (:func:`kdx.data.text.train_wordpiece`). Each document's ids are followed by the
end-of-document token (``[SEP]``, or the tokenizer's ``eos``), the stream of a split is cut into
blocks of ``block_size + 1`` tokens, and a block gives ``x = block[:-1]``, ``y = block[1:]``: the
target of position ``t`` is token ``t + 1``. The last partial block of a split is right-padded:
its padding has ``attention_mask = 0`` and target ``-100`` (:data:`~kdx.models.causal_lm.IGNORE_INDEX`),
which no loss and no metric reads. Validation and test blocks are held-out text: their perplexity is
the held-out perplexity kdx reports.

The blocks and the trained tokenizer are one verified cache entry (:func:`kdx.data.cache.load_or_build`)
under ``<cache_dir>/lm/<key>/``; the key covers the source (generated: its settings; local text: the
bytes of its files, :meth:`LMDataModule.data_fingerprint`, so a moved folder is the same data), the split,
the tokenizer and the block size. ``num_classes`` is the vocabulary size (``vocab_size``): the models'
"classes" are tokens.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdx.data.base import KDDataModule
from kdx.data.cache import content_digest, load_or_build
from kdx.data.synthetic_text import LANGUAGE_VERSION, make_split
from kdx.data.text import train_wordpiece
from kdx.errors import KDXError
from kdx.utils import atomic_write_json, stable_hash

IGNORE_INDEX = -100  # the same constant as kdx.models.causal_lm.IGNORE_INDEX (kept import-free)
_FORMAT = 1  # bump when the cached blocks' layout changes


class BlockDataset(Dataset):
    """Packed blocks ``(N, block_size + 1)`` of token ids and their lengths (padding after them)."""

    def __init__(self, blocks: Tensor, lengths: Tensor):
        self.blocks = blocks.long()
        self.lengths = lengths.long()

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int):
        block, length = self.blocks[index], int(self.lengths[index])
        x = block[:-1]
        mask = (torch.arange(x.shape[0]) < length - 1).long()
        y = block[1:].clone()
        y[length - 1 :] = IGNORE_INDEX
        return {"input_ids": x, "attention_mask": mask}, y, index

    @property
    def targets(self) -> Tensor:  # no class per block: the first target stands in (kdx.data.base)
        return self.blocks[:, 1]

    def target_tokens(self) -> Tensor:
        """Every next-token target that is read (padding excluded), flattened."""
        targets = self.blocks[:, 1:]
        read = torch.arange(targets.shape[1]) < (self.lengths - 1).unsqueeze(1)
        return targets[read]


def pack(ids: list[list[int]], eos: int, pad: int, block_size: int) -> tuple[Tensor, Tensor]:
    """Documents' ids, each followed by ``eos``, as one stream cut into blocks of ``block_size + 1``;
    the last partial block is padded with ``pad``. Returns the blocks and each block's real length."""
    stream = [t for doc in ids for t in (*doc, eos)]
    width = block_size + 1
    count = max(1, -(-len(stream) // width))
    blocks = torch.full((count, width), pad, dtype=torch.int32)
    lengths = torch.full((count,), width, dtype=torch.int32)
    flat = torch.tensor(stream, dtype=torch.int32)
    blocks.view(-1)[: flat.numel()] = flat
    lengths[-1] = flat.numel() - (count - 1) * width
    if lengths[-1] < 2:  # a block must predict at least one token
        blocks, lengths = blocks[:-1], lengths[:-1]
    return blocks, lengths


def read_documents(source: str, tsv_column: str | None = None) -> list[str]:
    """Documents of a file (one per non-empty line; a column of a TSV file with a header) or of a folder
    (one per ``.txt`` file, in name order)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise KDXError(
                f"dataset.datamodule.source={source} holds no .txt file; one document per .txt file"
            )
        return [f.read_text(encoding="utf-8").strip() for f in files if f.read_text(encoding="utf-8").strip()]
    if not path.is_file():
        raise KDXError(
            f"dataset.datamodule.source={source} is neither a file nor a folder; give a text file (one "
            "document per line), a folder of .txt files, or source=generated"
        )
    with path.open(encoding="utf-8", newline="") as handle:
        if tsv_column:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            if tsv_column not in (reader.fieldnames or []):
                raise KDXError(
                    f"{source} has no column {tsv_column!r} (header: {reader.fieldnames}); set "
                    "dataset.datamodule.tsv_column to one of them, or null for one document per line"
                )
            docs = [row[tsv_column].strip() for row in reader]
        else:
            docs = [line.strip() for line in handle]
    docs = [d for d in docs if d]
    if len(docs) < 3:
        raise KDXError(
            f"{source} holds {len(docs)} documents; language modelling needs at least 3 (train, val, test)"
        )
    return docs


class LMDataModule(KDDataModule):
    """Packed next-token blocks of generated or local text (see the module docstring)."""

    input_kind = "lm"
    name = "lm"

    def __init__(
        self,
        cache_dir: str,
        source: str = "generated",
        tsv_column: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 128,
        block_size: int = 32,
        num_train: int = 4000,
        num_val: int = 400,
        num_test: int = 400,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        name: str = "lm",
        **loader_kwargs: Any,
    ):
        super().__init__(**loader_kwargs)
        if block_size < 2:
            raise KDXError(f"dataset.datamodule.block_size={block_size} must be >= 2")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise KDXError(
                f"dataset.datamodule.val_fraction={val_fraction} and test_fraction={test_fraction} must be in "
                "(0, 1) and leave documents for training"
            )
        self.cache_dir = Path(cache_dir)
        self.source, self.tsv_column, self.tokenizer = str(source), tsv_column, tokenizer
        self.vocab_size = self.num_classes = int(vocab_size)
        self.block_size = int(block_size)
        self.input_shape = None
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.fractions = (float(val_fraction), float(test_fraction))
        self.seed = int(seed)
        self.name = name

    # -- the cache entry -----------------------------------------------------------------------
    def _files(self) -> list[Path]:
        path = Path(self.source).expanduser()
        return sorted(path.rglob("*.txt")) if path.is_dir() else [path]

    def data_fingerprint(self) -> str | None:
        """Local text: the bytes of its files (wherever they are) and what splits them; generated
        documents are named by their config (None)."""
        if self.source == "generated":
            return None
        missing = [f for f in self._files() if not f.is_file()]
        if missing or not self._files():
            read_documents(self.source, self.tsv_column)  # raises the one-line error naming the fix
        digests = [content_digest(f, self.cache_dir) for f in self._files()]
        return stable_hash([digests, self.tsv_column, self.fractions, self.seed], length=16)

    def _source_key(self) -> Any:
        if self.source == "generated":
            return ["generated", LANGUAGE_VERSION, self.sizes, self.seed]
        return self.data_fingerprint()

    @property
    def folder(self) -> Path:
        tokenizer = None if self.tokenizer is None else str(Path(self.tokenizer).expanduser().resolve())
        key = stable_hash(
            [_FORMAT, self._source_key(), tokenizer, self.vocab_size, self.block_size], length=16
        )
        return self.cache_dir / "lm" / key

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer the blocks were made with (a folder ``AutoTokenizer.from_pretrained`` reads)."""
        return Path(self.tokenizer).expanduser() if self.tokenizer else self.folder / "tokenizer"

    def documents(self) -> dict[str, list[str]]:
        if self.source == "generated":
            return {
                name: make_split(size, self.seed * 3 + offset)[0]
                for offset, (name, size) in enumerate(self.sizes.items())
            }
        docs = read_documents(self.source, self.tsv_column)
        random.Random(self.seed).shuffle(docs)
        n_val = max(1, round(self.fractions[0] * len(docs)))
        n_test = max(1, round(self.fractions[1] * len(docs)))
        return {"val": docs[:n_val], "test": docs[n_val : n_val + n_test], "train": docs[n_val + n_test :]}

    def _build(self) -> dict:
        docs = self.documents()
        if self.tokenizer:
            from kdx.models.hf import load_tokenizer  # transformers on use: optional (the text extra)

            tok = load_tokenizer(self.tokenizer)
        else:
            tok = train_wordpiece(docs["train"], self.vocab_size, self.tokenizer_dir)
        if len(tok) > self.vocab_size:
            raise KDXError(
                f"the tokenizer has {len(tok)} tokens but dataset.vocab_size={self.vocab_size}; set "
                f"dataset.vocab_size={len(tok)} (the models' vocabulary follows it)"
            )
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if eos is None:
            raise KDXError(
                f"tokenizer {self.tokenizer} has neither an eos nor a sep token to end documents with"
            )
        atomic_write_json(self.folder / "examples.json", {name: texts[:20] for name, texts in docs.items()})
        out = {}
        for name, texts in docs.items():
            ids = tok(list(texts), add_special_tokens=False)["input_ids"]
            blocks, lengths = pack(ids, int(eos), int(pad), self.block_size)
            out[name] = {"blocks": blocks, "lengths": lengths, "documents": torch.tensor(len(texts))}
        return out

    def _data(self) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        companions = [] if self.tokenizer else [self.tokenizer_dir]
        return load_or_build(
            self.folder / "data.pt", self._build, what="language-model", companions=companions
        )

    def prepare_data(self) -> None:
        self._data()

    def val_targets(self) -> Tensor:
        """Every next-token target of the validation split: ``val/student/acc`` is next-token accuracy,
        so chance is the most frequent token's share of them (tokens of one text are not independent,
        so the binomial test over them is a floor, not an exact level)."""
        dataset = self._built(self.val_set)
        if not isinstance(dataset, BlockDataset):
            raise TypeError(f"{type(self).__name__}.val_set is a {type(dataset).__name__}, not packed blocks")
        return dataset.target_tokens()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self._data()
        sets = {name: BlockDataset(part["blocks"], part["lengths"]) for name, part in data.items()}
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        self.note_examples({name: int(part["documents"]) for name, part in data.items()})

    def train_targets(self) -> Tensor:
        return self._built(self.train_set).targets  # type: ignore[union-attr]
