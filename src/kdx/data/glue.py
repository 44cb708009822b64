"""``dataset=glue dataset.task=<task>``: the GLUE classification tasks from local files.

Two layouts are read, the ones users have (kdx downloads nothing):

* the Hugging Face Hub's parquet files (``hf download nyu-mll/glue --repo-type dataset``):
  ``<root>/<task>/train-00000-of-00001.parquet``, ``validation-….parquet`` (MNLI:
  ``validation_matched-…`` / ``validation_mismatched-…``); integer labels;
* the original GLUE TSVs (``download_glue_data.py``): ``<root>/<TSV folder>/train.tsv`` and
  ``dev.tsv`` (MNLI: ``dev_matched.tsv`` / ``dev_mismatched.tsv``), folders ``SST-2``, ``CoLA``,
  ``MNLI``, ``QNLI``, ``QQP``, ``RTE``, ``MRPC``; labels as the TSVs spell them (``entailment``...)
  mapped to the Hub's integers. CoLA's TSVs have no header; the others do.

``<root>`` may also be the task folder itself. Parquet files are read with pandas (pyarrow); TSVs
strictly (:func:`read_tsv`): a row with the wrong number of fields, a missing or unknown label or a
header without the task's columns is one error naming the file, the line and the fix: no row is
ever skipped, and ``examples_read`` holds the rows read per split.

Splits: GLUE's test labels are private, so dev is kdx's test split (reported: ``student/acc`` on the
last checkpoint, ``student/acc_best`` on the best one), and the best epoch is selected on a
validation split held out of the training file: ``val_size`` rows (or a fraction), drawn by
``val_seed``, a data seed independent of the run's ``seed`` so that every run of a comparison
selects on the same rows. ``conf/dataset/glue.yaml`` holds out as many rows as the task's dev split
has (872 for SST-2, 1.3 % of its training rows: selection noise of the same size as the reported
figure's, and at most 12 % of any task's training rows). ``val_size=0`` is the protocol of the
GLUE papers (ProKT included): dev both selects and is reported, which overstates what selection
found; ``experiment=prokt_glue/*`` keeps it to reproduce them. ``examples_read`` says how the
training file was divided: ``train`` (its rows), ``train_used`` (the rows trained on), ``val`` (the
held-out rows, or dev's at ``val_size=0``), ``test`` (dev's). kdx reports accuracy; CoLA is usually
reported as Matthews correlation and MRPC / QQP also as F1, which kdx does not compute.

Tokenisation: each model's own tokenizer (a local folder, ``model.tokenizer``), or
``model.tokenizer=train``: a lower-cased WordPiece tokenizer of ``tokenizer_vocab_size`` tokens
trained on the training file's sentences (:meth:`GLUEDataModule.trained_tokenizer`), shared by the
models that name it, cached under ``<cache_dir>/tokenizers/``. A model built from a config (no
checkpoint) and naming no tokenizer gets it by default on GLUE, and its vocabulary is the
tokenizer's (:func:`kdx.pipeline.build.resolve_tokenizers`). Sentence pairs as the tokenizer joins
them, truncated to ``max_length``. The student's tokenisation is under ``input_ids`` /
``attention_mask`` / ``token_type_ids``; when the teacher's tokenizer differs, its tokenisation is
added under ``teacher.input_ids`` / ... (see :mod:`kdx.models.hf`).

Identity: the data are named by their content (:meth:`GLUEDataModule.data_fingerprint`: the sha256
of the training and dev files' bytes), never by where they are, in every cache key: the
tokenisation (``<cache_dir>/glue/``, keyed also by the tokenizer and ``max_length``), the trained
tokenizer, the auto-teacher and the teacher outputs. A moved or copied folder reuses all of them.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdx.data.cache import check_entry, content_digest, load_or_build
from kdx.data.text import (
    TEACHER_PREFIX,
    TRAIN_TOKENIZER,
    TextDataModule,
    TextDataset,
    cached,
    encode,
    tokenizer_fingerprint,
    train_wordpiece,
    widen,
)
from kdx.errors import KDXError
from kdx.models.hf import load_tokenizer
from kdx.utils import stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    tsv_folder: str
    num_classes: int
    fields: tuple[str, str | None]  # parquet columns of the sentence(s)
    tsv_fields: tuple[str, str | None]
    tsv_label: str
    dev: str = "validation"  # the Hub's split name of the dev set
    tsv_dev: str = "dev"
    label_names: tuple[str, ...] = ()  # TSV label strings, in the Hub's integer order
    tsv_header: tuple[str, ...] | None = None  # column names of a header-less TSV
    # how the GLUE papers score the task besides accuracy (kdx.metrics.SCORES: "mcc", "f1"); the
    # first one is the task's metric (what picks the best checkpoint), accuracy when there is none
    scores: tuple[str, ...] = ()

    @property
    def monitor(self) -> str:
        return f"val/student/{self.scores[0]}" if self.scores else "val/student/acc"


TASKS: dict[str, Task] = {
    "sst2": Task("SST-2", 2, ("sentence", None), ("sentence", None), "label"),
    "cola": Task(
        "CoLA",
        2,
        ("sentence", None),
        ("sentence", None),
        "label",
        tsv_header=("source", "label", "original_label", "sentence"),
        scores=("mcc",),
    ),
    "mnli": Task(
        "MNLI",
        3,
        ("premise", "hypothesis"),
        ("sentence1", "sentence2"),
        "gold_label",
        dev="validation_matched",
        tsv_dev="dev_matched",
        label_names=("entailment", "neutral", "contradiction"),
    ),
    "qnli": Task(
        "QNLI",
        2,
        ("question", "sentence"),
        ("question", "sentence"),
        "label",
        label_names=("entailment", "not_entailment"),
    ),
    "qqp": Task(
        "QQP", 2, ("question1", "question2"), ("question1", "question2"), "is_duplicate", scores=("f1",)
    ),
    "rte": Task(
        "RTE",
        2,
        ("sentence1", "sentence2"),
        ("sentence1", "sentence2"),
        "label",
        label_names=("entailment", "not_entailment"),
    ),
    "mrpc": Task(
        "MRPC", 2, ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", scores=("f1",)
    ),
}
# the other MNLI dev set: dataset.dev_split=validation_mismatched
_TSV_DEV = {
    "validation_mismatched": "dev_mismatched",
    "validation_matched": "dev_matched",
    "validation": "dev",
}


def how_to_get(task: str, root: Path) -> str:
    return (
        f"get the files with `hf download nyu-mll/glue --repo-type dataset --include '{task}/*' "
        f"--local-dir {root}` (parquet) or put GLUE's original {TASKS[task].tsv_folder}/ folder of TSVs "
        f"(download_glue_data.py) in {root}, then pass dataset.root={root}"
    )


def find_split(root: Path, task: str, split: str) -> tuple[str, list[Path]]:
    """``("parquet" | "tsv", files)`` of one split (``train`` or a Hub dev split name)."""
    spec = TASKS[task]
    folders = [
        root / task,
        root / "data" / task,
        root / spec.tsv_folder,
        root / "glue_data" / spec.tsv_folder,
        root,
    ]
    tsv_name = "train" if split == "train" else _TSV_DEV.get(split, split)
    for folder in folders:
        parquet = sorted(Path(p) for p in glob.glob(str(folder / f"{split}-*.parquet")))
        parquet = parquet or [p for p in [folder / f"{split}.parquet"] if p.is_file()]
        if parquet:
            return "parquet", parquet
        if (folder / f"{tsv_name}.tsv").is_file():
            return "tsv", [folder / f"{tsv_name}.tsv"]
    looked = ", ".join(str(f) for f in dict.fromkeys(folders))
    raise KDXError(
        f"GLUE {task} {split} split not found: looked for {split}-*.parquet and {tsv_name}.tsv in {looked}; "
        + how_to_get(task, root)
    )


def _label_fix(task: str) -> str:
    spec = TASKS[task]
    allowed = spec.label_names or tuple(str(i) for i in range(spec.num_classes))
    return f"GLUE {task} labels are {', '.join(allowed)}"


def read_tsv(task: str, file: Path) -> tuple[list[str], list[str] | None, list[int]]:
    """One GLUE TSV, read strictly: every row has the header's number of fields and a known label,
    or a :class:`KDXError` names the file, the line and the fix (no row is ever skipped).

    GLUE's TSVs are unquoted (``csv.QUOTE_NONE``): fields are separated by one tab and hold none."""
    spec = TASKS[task]
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise KDXError(
            f"{file}:{line}: not UTF-8 text ({error.reason}); save the file as UTF-8 (GLUE's TSVs are)"
        ) from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    first_name, second_name = spec.tsv_fields
    wanted = [c for c in (first_name, second_name, spec.tsv_label) if c is not None]
    if spec.tsv_header:
        header, start = list(spec.tsv_header), 0
    else:
        if not lines:
            raise KDXError(
                f"{file}: empty file; GLUE {task} TSVs start with a header line ({', '.join(wanted)}...)"
            )
        header, start = lines[0].split("\t"), 1
        missing = [c for c in wanted if c not in header]
        if missing:
            raise KDXError(
                f"{file}:1: the header has no column(s) {', '.join(missing)} (it has {', '.join(header)}); "
                f"GLUE {task} TSVs need the columns {', '.join(wanted)}: fix the header, or is it another task's file?"
            )
    columns = {name: i for i, name in enumerate(header)}
    index = {name: i for i, name in enumerate(spec.label_names)}
    first, second, labels = [], [] if second_name else None, []
    for number, line in enumerate(lines[start:], start=start + 1):
        fields = line.split("\t")
        if len(fields) != len(header):
            what = "a blank line" if line.strip() == "" else f"{len(fields)} tab-separated fields"
            raise KDXError(
                f"{file}:{number}: {what} where the header has {len(header)} "
                f"({', '.join(header)}); fix or delete that row (a tab inside a sentence splits it; "
                "kdx skips no rows), or use the Hub's parquet files"
            )
        label = fields[columns[spec.tsv_label]].strip()
        value = index.get(label) if spec.label_names else (int(label) if label.isdigit() else None)
        if value is None or not 0 <= value < spec.num_classes:
            shown = "empty" if label == "" else repr(label)
            raise KDXError(
                f"{file}:{number}: the label ({spec.tsv_label}) is {shown}; {_label_fix(task)}: "
                "fix or delete that row (GLUE's test split has no labels: kdx uses train and dev)"
            )
        first.append(fields[columns[first_name]])
        if second is not None:
            second.append(fields[columns[second_name]])
        labels.append(value)
    if not labels:
        raise KDXError(f"{file}: no examples (only a header); is it the right file?")
    return first, second, labels


def read_split(task: str, layout: str, files: list[Path]) -> tuple[list[str], list[str] | None, list[int]]:
    """Sentences (one or two lists) and integer labels of one split's files; every row of the
    files is an example (a bad row is an error, never skipped)."""
    spec = TASKS[task]
    if layout != "parquet":
        return read_tsv(task, files[0])
    import pandas as pd  # pandas on use: only GLUE's parquet files need it

    frames = [pd.read_parquet(f) for f in files]
    first, second = spec.fields
    for file, frame in zip(files, frames):
        missing = [c for c in (first, second, "label") if c is not None and c not in frame.columns]
        if missing:
            raise KDXError(
                f"{file} has no column(s) {missing} (columns: {list(frame.columns)}); is it GLUE {task}?"
            )
        for row, label in enumerate(frame["label"].tolist()):
            if label is None or label != label or not 0 <= int(label) < spec.num_classes:
                raise KDXError(
                    f"{file}: row {row}: the label is {label!r}; {_label_fix(task)} "
                    "(GLUE's test split has no labels: kdx uses train and dev)"
                )
    frame = pd.concat(frames, ignore_index=True)
    labels = [int(v) for v in frame["label"]]
    texts_b = None if second is None else frame[second].astype(str).tolist()
    return frame[first].astype(str).tolist(), texts_b, labels


_TOKENIZER_SETTINGS = {"kind": "wordpiece", "lowercase": True, "format": 1}  # what train_wordpiece builds


def split_size(value: int | float, rows: int, what: str) -> int:
    """``value`` rows (an int) or that fraction of ``rows`` (a float in (0, 1)), checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise KDXError(f"{what}={value!r} must be a number of rows (>= 0) or a fraction in (0, 1)")
    size = round(value * rows) if isinstance(value, float) and value < 1 else int(value)
    if size >= rows:
        raise KDXError(
            f"{what}={value} holds out {size} of the {rows} training rows, leaving none to train on; "
            "lower it (0: select on the dev split, as the GLUE papers do)"
        )
    return size


class GLUEDataModule(TextDataModule):
    name = "glue"
    trains_tokenizer = True

    def __init__(
        self,
        task: str,
        root: str,
        cache_dir: str,
        student_tokenizer: str | None = None,
        teacher_tokenizer: str | None = None,
        max_length: int = 128,
        dev_split: str | None = None,
        max_train_samples: int | None = None,
        val_size: int | float = 0,
        val_seed: int = 0,
        tokenizer_vocab_size: int = 8000,
        **loader_kwargs: Any,
    ):
        super().__init__(max_length=max_length, **loader_kwargs)
        if task not in TASKS:
            raise KDXError(f"dataset.task={task!r} is not one of {', '.join(TASKS)}")
        if int(tokenizer_vocab_size) < 16:
            raise KDXError(
                f"dataset.tokenizer_vocab_size={tokenizer_vocab_size} is too small for a WordPiece "
                "vocabulary (5 special tokens and the characters); use a few thousand (default 8000)"
            )
        self.task = task
        self.num_classes = TASKS[task].num_classes
        self.scores = TASKS[task].scores  # read by the module's metrics (kdx.metrics.SCORES)
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir)
        self.tokenizer_vocab_size = int(tokenizer_vocab_size)
        self.tokenizers = {"": str(student_tokenizer)} if student_tokenizer is not None else {}
        if teacher_tokenizer is not None and str(teacher_tokenizer) != str(student_tokenizer):
            self.tokenizers[TEACHER_PREFIX] = str(teacher_tokenizer)
        self.dev_split = dev_split or TASKS[task].dev
        self.max_train_samples = max_train_samples
        self.val_size = val_size
        self.val_seed = int(val_seed)

    # -- identity ------------------------------------------------------------------------------
    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise KDXError(f"GLUE folder {self.root} does not exist; " + how_to_get(self.task, self.root))

    def _split_digest(self, split: str) -> tuple[str, list[Path], str]:
        """``(layout, files, digest of their bytes)`` of one split."""
        layout, files = find_split(self.root, self.task, split)
        digests = [content_digest(f, self.cache_dir) for f in files]
        return layout, files, stable_hash([layout, digests], length=16)

    def data_fingerprint(self) -> str:
        """The task and the bytes of its training and dev files (wherever the folder is)."""
        self._check_root()
        return stable_hash(
            [
                self.task,
                self._split_digest("train")[2],
                self.dev_split,
                self._split_digest(self.dev_split)[2],
            ],
            length=16,
        )

    # -- tokenizers ----------------------------------------------------------------------------
    def trained_tokenizer(self, create: bool = True) -> Path:
        """The WordPiece tokenizer of ``dataset.tokenizer_vocab_size`` trained on every sentence of
        the training file (both sentences of a pair; the held-out validation rows included: their
        words, never their labels), built once and cached under ``<cache_dir>/tokenizers/`` keyed
        by the file's content, the vocabulary size and the tokenizer settings. The folder is a
        checked companion of its cache entry: a damaged or half-written tokenizer is moved aside
        and trained again. ``create=False`` (kdx-eval): one that is not cached is an error."""
        self._check_root()
        layout, files, digest = self._split_digest("train")
        settings = {**_TOKENIZER_SETTINGS, "vocab_size": self.tokenizer_vocab_size}
        name = f"glue-{self.task}-{stable_hash([self.task, digest, settings], length=16)}"
        folder = self.cache_dir / "tokenizers" / name

        def build() -> dict:
            first, second, _ = read_split(self.task, layout, files)
            log.info(
                "GLUE %s: training a %d-token WordPiece tokenizer on the training split",
                self.task,
                self.tokenizer_vocab_size,
            )
            tokenizer = train_wordpiece([*first, *(second or [])], self.tokenizer_vocab_size, folder)
            return {"vocab_size": torch.tensor(len(tokenizer))}

        entry = folder.with_name(name + ".pt")
        if not create and check_entry(entry, [folder])[0] is None:
            raise KDXError(
                f"the tokenizer trained on {files[0]} is not in the cache ({folder}); kdx-eval trains "
                "nothing: evaluate a run whose metrics.json names its tokenizer, or run kdx-train on these data"
            )
        load_or_build(entry, build, what=f"GLUE {self.task} tokenizer", companions=[folder])
        return folder

    def tokenizer_folders(self) -> dict[str, str]:
        """:attr:`tokenizers` with ``train`` replaced by the trained tokenizer's folder."""
        if "" not in self.tokenizers:
            raise KDXError(
                "dataset=glue tokenises with the student's tokenizer: set student.model.tokenizer=<folder> "
                f"(it defaults to student.model.name_or_path), or student.model.tokenizer={TRAIN_TOKENIZER} "
                "to train one on the training split"
            )
        return {
            prefix: str(self.trained_tokenizer()) if path == TRAIN_TOKENIZER else path
            for prefix, path in self.tokenizers.items()
        }

    # -- splits --------------------------------------------------------------------------------
    def _encoded(self, split: str) -> dict:
        layout, files, digest = self._split_digest(split)
        tokenizers = {prefix: load_tokenizer(path) for prefix, path in self.tokenizer_folders().items()}
        key = self.cache_key(
            self.task,
            split,
            digest,  # the files' content: a moved folder reuses its tokenisation
            {prefix: tokenizer_fingerprint(tok) for prefix, tok in tokenizers.items()},
            self.max_length,
        )
        path = self.cache_dir / "glue" / f"{self.task}-{split}-{key}.pt"

        def build() -> dict:
            first, second, labels = read_split(self.task, layout, files)
            encodings = {}
            for prefix, tok in tokenizers.items():
                for name, value in encode(tok, first, second, self.max_length).items():
                    encodings[prefix + name] = value
            return {"encodings": encodings, "labels": torch.tensor(labels)}

        return cached(path, build, what=f"GLUE {self.task} {split}")

    def prepare_data(self) -> None:
        self._check_root()
        for split in ("train", self.dev_split):
            self._encoded(split)

    def held_out(self, rows: int) -> tuple[Tensor, Tensor]:
        """``(training rows, validation rows)`` of a training file of ``rows`` rows: ``val_size``
        rows drawn by ``val_seed`` (independent of the run's seed: every run of a comparison
        selects on the same rows), both in file order; no validation rows at ``val_size=0``."""
        size = split_size(self.val_size, rows, "dataset.datamodule.val_size")
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(self.val_seed))
        return order[size:].sort().values, order[:size].sort().values

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_root()
        train, dev = self._encoded("train"), self._encoded(self.dev_split)
        encodings, labels = widen(train["encodings"]), train["labels"]
        rows = len(labels)
        train_rows, val_rows = self.held_out(rows)
        dev_set = TextDataset(widen(dev["encodings"]), dev["labels"])
        if len(val_rows):
            self.val_set = TextDataset({k: v[val_rows] for k, v in encodings.items()}, labels[val_rows])
        else:
            self.val_set = dev_set  # the GLUE papers' protocol: dev selects and is reported
        self.test_set = dev_set
        if self.max_train_samples and self.max_train_samples < len(train_rows):
            log.info(
                "GLUE %s: training on the first %d of %d training rows (dataset.max_train_samples)",
                self.task,
                self.max_train_samples,
                len(train_rows),
            )
            train_rows = train_rows[: self.max_train_samples]
        self.train_set = TextDataset({k: v[train_rows] for k, v in encodings.items()}, labels[train_rows])
        # the rows of the files (every one is an example), and how the training file was divided
        counts = {"train": rows, "val": len(self.val_set), "test": len(dev_set)}
        if len(train_rows) != rows:
            counts["train_used"] = len(train_rows)
        self.note_examples(counts)
