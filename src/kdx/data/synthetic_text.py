"""``dataset=synthetic_text``: a generated review language whose label needs more than word counts.

Each review is an optional *frame* and one to three *clauses* joined by ``and`` / ``and also``::

    [frame] the NOUN was|is [not|never] [INTENSIFIER] ADJECTIVE [FILLER] (and the NOUN was ...)*

* every noun of a review is about one topic, food or service;
* every clause expresses the review's verdict: a positive adjective, or ``not`` / ``never`` and a
  negative one (20 % of clauses are negated), so an adjective alone is a noisy cue;
* a frame at the very start flips the verdict (``i doubt that``, ``nobody would say that``, ``it is
  false that``; 15 % of reviews) or keeps it (``i am sure that``, ...; 15 %): a dependency across
  the whole review;
* the class is topic × stated verdict (after the frame): 0 food-negative, 1 food-positive,
  2 service-negative, 3 service-positive.

A bag-of-words logistic regression reaches 71 % (80 % with up to tri-grams): the rest needs the
negation bound to its adjective and the frame read from the start. ``label_noise`` flips that
fraction of training labels to a random other class (validation and test stay clean).
``LANGUAGE_VERSION`` is part of the cache key (docs/text.md tells why earlier versions were dropped).

The data and a WordPiece tokenizer trained on the training reviews (``tokenizers``) are generated
from ``seed`` and cached under ``<cache_dir>/synthetic_text/<hash>/``; every run of a sweep sees
the same data and the same token ids. No download, a second or two to build.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from kdx.data.text import TextDataModule, TextDataset, cached, encode, train_wordpiece, widen
from kdx.utils import atomic_write_json

FOOD = ("soup", "pasta", "bread", "dessert", "salad", "coffee", "pizza", "steak", "wine", "curry")
SERVICE = (
    "waiter",
    "staff",
    "service",
    "host",
    "manager",
    "waitress",
    "cashier",
    "owner",
    "crew",
    "bartender",
)
POSITIVE = (
    "good",
    "great",
    "tasty",
    "friendly",
    "excellent",
    "lovely",
    "fine",
    "superb",
    "pleasant",
    "decent",
)
NEGATIVE = ("bad", "awful", "rude", "bland", "terrible", "cold", "poor", "slow", "dreadful", "stale")
NEGATORS = ("not", "never")
INTENSIFIERS = ("very", "really", "quite", "so", "extremely", "rather")
FILLERS = ("today", "again", "as usual", "this time", "tonight", "at first", "for once", "honestly")
FLIP_FRAMES = ("i doubt that", "nobody would say that", "it is false that")
KEEP_FRAMES = ("i am sure that", "everyone agrees that", "it is true that")
CLASS_NAMES = ("food-negative", "food-positive", "service-negative", "service-positive")
LANGUAGE_VERSION = 4  # bump when the generator changes: the cache key includes it


def make_review(rng: random.Random) -> tuple[str, int]:
    """One review and its class (see the module docstring for the rules)."""
    words: list[str] = []
    flip = False
    frame = rng.random()
    if frame < 0.15:
        words.append(rng.choice(FLIP_FRAMES))
        flip = True
    elif frame < 0.3:
        words.append(rng.choice(KEEP_FRAMES))
    topic = rng.randrange(2)
    verdict = rng.random() < 0.5  # the polarity every clause expresses, negations included
    for i in range(rng.choice((1, 2, 2, 3))):
        negated = rng.random() < 0.2
        positive = verdict != negated
        clause = ["the", rng.choice(FOOD if topic == 0 else SERVICE), rng.choice(("was", "is"))]
        if negated:
            clause.append(rng.choice(NEGATORS))
        if rng.random() < 0.4:
            clause.append(rng.choice(INTENSIFIERS))
        clause.append(rng.choice(POSITIVE if positive else NEGATIVE))
        if rng.random() < 0.3:
            clause.append(rng.choice(FILLERS))
        if i:
            words.append(rng.choice(("and", "and also")))
        words.extend(clause)
    return " ".join(words), 2 * topic + int(verdict != flip)


def make_split(n: int, seed: int, label_noise: float = 0.0) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        text, label = make_review(rng)
        if label_noise and rng.random() < label_noise:
            label = rng.choice([c for c in range(len(CLASS_NAMES)) if c != label])
        texts.append(text)
        labels.append(label)
    return texts, labels


class SyntheticTextDataModule(TextDataModule):
    name = "synthetic_text"
    num_classes = len(CLASS_NAMES)

    def __init__(
        self,
        cache_dir: str,
        num_train: int = 8000,
        num_val: int = 1000,
        num_test: int = 2000,
        label_noise: float = 0.0,
        vocab_size: int = 200,
        seed: int = 0,
        max_length: int = 64,
        **loader_kwargs: Any,
    ):
        super().__init__(max_length=max_length, **loader_kwargs)
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"dataset.label_noise={label_noise} must lie in [0, 1)")
        self.cache_dir = Path(cache_dir)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.label_noise = label_noise
        self.vocab_size = vocab_size
        self.seed = seed
        self.tokenizers = {"": str(self.tokenizer_dir)}  # trained on the training reviews in setup

    @property
    def folder(self) -> Path:
        key = self.cache_key(
            LANGUAGE_VERSION, self.sizes, self.label_noise, self.vocab_size, self.seed, self.max_length
        )
        return self.cache_dir / "synthetic_text" / key

    @property
    def tokenizer_dir(self) -> Path:
        """The locally trained tokenizer (a folder ``AutoTokenizer.from_pretrained`` reads)."""
        return self.folder / "tokenizer"

    def _build(self) -> dict:
        splits = {
            # distinct streams per split: the test reviews are not a prefix of the training ones
            name: make_split(size, self.seed * 3 + offset, self.label_noise if name == "train" else 0.0)
            for offset, (name, size) in enumerate(self.sizes.items())
        }
        tokenizer = train_wordpiece(splits["train"][0], self.vocab_size, self.tokenizer_dir)
        atomic_write_json(
            self.folder / "examples.json", {name: texts[:20] for name, (texts, _) in splits.items()}
        )
        return {
            name: {
                "encodings": encode(tokenizer, texts, None, self.max_length),
                "labels": torch.tensor(labels),
            }
            for name, (texts, labels) in splits.items()
        }

    def prepare_data(self) -> None:
        self._data()

    def _data(self) -> dict:
        # data.pt and the tokenizer are one checked entry: built together, moved aside together
        return cached(
            self.folder / "data.pt", self._build, what="synthetic_text", companions=[self.tokenizer_dir]
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self._data()
        sets = {name: TextDataset(widen(part["encodings"]), part["labels"]) for name, part in data.items()}
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        self.note_examples()
