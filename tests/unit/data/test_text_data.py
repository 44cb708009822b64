"""Text data: GLUE files in both real layouts (Hub parquet, original TSV), synthetic_text, padding."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from kdx.data.glue import TASKS, GLUEDataModule
from kdx.data.synthetic_text import FOOD, POSITIVE, SERVICE, SyntheticTextDataModule, make_review
from kdx.data.text import train_wordpiece, trim_padding
from kdx.errors import KDXError

WORDS = "the a cat dog sat on mat is good bad not what who why yes no movie was great awful".split()

# Rows per task as the files spell them: (parquet columns, TSV header or None, TSV rows).
# The TSV label strings map to the Hub's integers in TASKS[task].label_names order.
SENT = ("the cat sat", "a dog is good")
PAIR = ("the cat sat", "a dog sat", "what is good", "the movie was bad")
FILES = {
    "sst2": (
        {"sentence": list(SENT), "label": [1, 0], "idx": [0, 1]},
        ["sentence", "label"],
        [[SENT[0], "1"], [SENT[1], "0"]],
    ),
    "cola": (
        {"sentence": list(SENT), "label": [1, 0], "idx": [0, 1]},
        None,  # CoLA's TSVs have no header: source, label, original label, sentence
        [["gj04", "1", "", SENT[0]], ["gj04", "0", "*", SENT[1]]],
    ),
    "mnli": (
        {"premise": PAIR[:2], "hypothesis": PAIR[2:], "label": [2, 0], "idx": [0, 1]},
        ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"],
        [
            ["0", "1", "1e", "fiction", PAIR[0], PAIR[2], "contradiction", "contradiction"],
            ["1", "2", "2e", "fiction", PAIR[1], PAIR[3], "entailment", "entailment"],
        ],
    ),
    "qnli": (
        {"question": PAIR[:2], "sentence": PAIR[2:], "label": [1, 0], "idx": [0, 1]},
        ["index", "question", "sentence", "label"],
        [["0", PAIR[0], PAIR[2], "not_entailment"], ["1", PAIR[1], PAIR[3], "entailment"]],
    ),
    "qqp": (
        {"question1": PAIR[:2], "question2": PAIR[2:], "label": [1, 0], "idx": [0, 1]},
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        [["0", "1", "2", PAIR[0], PAIR[2], "1"], ["1", "3", "4", PAIR[1], PAIR[3], "0"]],
    ),
    "rte": (
        {"sentence1": PAIR[:2], "sentence2": PAIR[2:], "label": [1, 0], "idx": [0, 1]},
        ["index", "sentence1", "sentence2", "label"],
        [["0", PAIR[0], PAIR[2], "not_entailment"], ["1", PAIR[1], PAIR[3], "entailment"]],
    ),
    "mrpc": (
        {"sentence1": PAIR[:2], "sentence2": PAIR[2:], "label": [1, 0], "idx": [0, 1]},
        ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        [["1", "11", "12", PAIR[0], PAIR[2]], ["0", "13", "14", PAIR[1], PAIR[3]]],
    ),
}
# what every layout must give: the first row's label
EXPECTED_LABELS = {
    "sst2": [1, 0],
    "cola": [1, 0],
    "mnli": [2, 0],
    "qnli": [1, 0],
    "qqp": [1, 0],
    "rte": [1, 0],
}
EXPECTED_LABELS["mrpc"] = [1, 0]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    train_wordpiece(corpus, 60, root / "student")
    train_wordpiece(corpus[::-1] + ["cat dog"], 70, root / "teacher")
    return str(root / "student"), str(root / "teacher")


def write_parquet(root, task):
    columns, _, _ = FILES[task]
    folder = root / task
    folder.mkdir(parents=True)
    dev = TASKS[task].dev
    for split in ("train", dev):
        pd.DataFrame(columns).to_parquet(folder / f"{split}-00000-of-00001.parquet")


def write_tsv(root, task):
    _, header, rows = FILES[task]
    folder = root / TASKS[task].tsv_folder
    folder.mkdir(parents=True)
    lines = ([] if header is None else ["\t".join(header)]) + ["\t".join(r) for r in rows]
    for name in ("train", TASKS[task].tsv_dev):
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("layout", ["parquet", "tsv"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_glue_task_reads_both_layouts(task, layout, tokenizers, tmp_path):
    (write_parquet if layout == "parquet" else write_tsv)(tmp_path / "glue", task)
    student, teacher = tokenizers
    dm = GLUEDataModule(
        task, str(tmp_path / "glue"), str(tmp_path / "cache"), student, teacher, max_length=16, batch_size=2
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == TASKS[task].num_classes
    assert dm.train_set.labels.tolist() == EXPECTED_LABELS[task]
    assert dm.val_set is dm.test_set and len(dm.val_set) == 2
    x, y, index = dm.train_set[0]
    # both tokenisations, each from its own tokenizer; pairs have a second segment
    assert {"input_ids", "attention_mask", "teacher.input_ids", "teacher.attention_mask"} <= set(x)
    assert x["input_ids"].shape == (16,) and int(y) == EXPECTED_LABELS[task][0] and index == 0
    if TASKS[task].fields[1] is not None:
        assert int(x["token_type_ids"].max()) == 1
    assert list(tmp_path.joinpath("cache", "glue").glob(f"{task}-train-*.pt"))  # cached


def test_glue_cache_is_reused_and_shared_tokenizer_emits_one_tokenisation(tokenizers, tmp_path, monkeypatch):
    write_tsv(tmp_path / "glue", "rte")
    student, _ = tokenizers
    make = lambda: GLUEDataModule("rte", str(tmp_path / "glue"), str(tmp_path / "c"), student, student)  # noqa: E731
    make().setup("fit")
    import kdx.data.glue as glue

    monkeypatch.setattr(glue, "read_split", lambda *a: pytest.fail("files read again despite the cache"))
    dm = make()
    dm.setup("fit")
    assert not any(k.startswith("teacher.") for k in dm.train_set.encodings)


def test_glue_missing_folder_is_one_clear_error(tokenizers, tmp_path):
    dm = GLUEDataModule("sst2", str(tmp_path / "nowhere"), str(tmp_path / "c"), tokenizers[0])
    with pytest.raises(KDXError, match=r"does not exist; get the files with `hf download nyu-mll/glue"):
        dm.prepare_data()
    (tmp_path / "empty").mkdir()
    dm = GLUEDataModule("mnli", str(tmp_path / "empty"), str(tmp_path / "c"), tokenizers[0])
    with pytest.raises(KDXError, match=r"looked for train-\*\.parquet and train\.tsv in .*MNLI"):
        dm.setup("fit")
    with pytest.raises(KDXError, match="not one of"):
        GLUEDataModule("stsb", str(tmp_path), str(tmp_path), tokenizers[0])


def test_trim_padding_cuts_each_tokenisation_to_its_longest_row():
    rows = [
        ({"input_ids": torch.tensor([2, 5, 3, 0, 0]), "attention_mask": torch.tensor([1, 1, 1, 0, 0])}, 0, 0),
        ({"input_ids": torch.tensor([2, 3, 0, 0, 0]), "attention_mask": torch.tensor([1, 1, 0, 0, 0])}, 1, 1),
    ]
    rows[0][0]["teacher.input_ids"] = torch.tensor([2, 5, 6, 7, 3])
    rows[0][0]["teacher.attention_mask"] = torch.ones(5, dtype=torch.long)
    rows[1][0]["teacher.input_ids"] = torch.tensor([2, 3, 0, 0, 0])
    rows[1][0]["teacher.attention_mask"] = torch.tensor([1, 1, 0, 0, 0])
    x, y, _ = trim_padding(rows)
    assert x["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]  # 3 = the longest student row
    assert x["teacher.input_ids"].shape == (2, 5) and y.tolist() == [0, 1]


def test_synthetic_review_rules():
    rng = random.Random(0)
    reviews = [make_review(rng) for _ in range(3000)]
    for text, label in reviews:
        # the class is 2·topic + polarity, and every clause is about the review's topic
        nouns = [w for w in text.split() if w in FOOD or w in SERVICE]
        assert all((n in SERVICE) == (label >= 2) for n in nouns)
    # "the <noun> was|is <adjective>" (no frame, negation, intensifier or filler): by hand, the
    # class is 2·[noun is service] + [adjective is positive]
    plain = [(t.split(), lab) for t, lab in reviews if len(t.split()) == 4]
    assert len(plain) > 10
    for (_, noun, _, adjective), label in plain:
        assert label == 2 * (noun in SERVICE) + (adjective in POSITIVE)
    # a flipping frame in front of the same plain clause gives the other polarity
    flipped = [(t.split(), lab) for t, lab in reviews if t.startswith("i doubt that") and len(t.split()) == 7]
    assert flipped
    for words, label in flipped:
        assert label == 2 * (words[4] in SERVICE) + (words[6] not in POSITIVE)


def test_synthetic_text_module_caches_data_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    kwargs = dict(num_train=40, num_val=10, num_test=10, vocab_size=90, batch_size=8)
    dm = SyntheticTextDataModule(str(tmp_path), **kwargs)
    dm.setup("fit")
    tokenizer = AutoTokenizer.from_pretrained(str(dm.tokenizer_dir))
    x, y, _ = dm.train_set[0]
    decoded = tokenizer.decode(x["input_ids"][x["attention_mask"].bool()], skip_special_tokens=True)
    assert decoded.split()[0] in {"the", "i", "it", "nobody", "everyone"}
    again = SyntheticTextDataModule(str(tmp_path), **kwargs)
    again.setup("fit")
    assert torch.equal(again.train_set.encodings["input_ids"], dm.train_set.encodings["input_ids"])
    assert len(dm.val_set) == 10 and dm.input_shape == (64,)


def test_text_train_targets_are_the_training_labels_in_index_order(tokenizers, tmp_path):
    write_tsv(tmp_path / "glue", "mnli")
    glue = GLUEDataModule("mnli", str(tmp_path / "glue"), str(tmp_path / "c"), *tokenizers)
    generated = SyntheticTextDataModule(str(tmp_path), num_train=40, num_val=10, num_test=10, vocab_size=90)
    assert glue.tokenizers == {"": tokenizers[0], "teacher.": tokenizers[1]}
    assert generated.tokenizers == {"": str(generated.tokenizer_dir)}
    for dm in (glue, generated):
        dm.setup("fit")
        items = [dm.train_set[i] for i in range(len(dm.train_set))]
        assert [index for _, _, index in items] == list(range(len(items)))
        targets = dm.train_targets()
        assert targets.dtype == torch.int64 and targets.tolist() == [int(y) for _, y, _ in items]
        assert len(set(targets.tolist())) > 1


# -- strict TSVs, examples read, checked caches ----------------------------------------


def _sst2(tmp_path, lines, tokenizers):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nthe cat sat\t1\n")
    return GLUEDataModule("sst2", str(tmp_path / "glue"), str(tmp_path / "c"), tokenizers[0], max_length=16)


def test_glue_reads_every_row_and_says_how_many(tokenizers, tmp_path):
    rows = [f"{WORDS[i % len(WORDS)]} cat\t{i % 2}" for i in range(300)]
    dm = _sst2(tmp_path, ["sentence\tlabel", *rows], tokenizers)
    dm.setup("fit")
    assert len(dm.train_set) == 300 and dm.examples_read == {"train": 300, "val": 1, "test": 1}


@pytest.mark.parametrize(
    ("bad", "line", "says"),
    [
        (
            "the cat\tsat\t1",
            3,
            r"3 tab-separated fields where the header has 2 \(sentence, label\); fix or delete",
        ),
        ("the cat sat", 3, r"1 tab-separated fields where the header has 2"),
        ("the cat sat\t", 3, r"the label \(label\) is empty; GLUE sst2 labels are 0, 1"),
        ("the cat sat\tx", 3, r"the label \(label\) is 'x'; GLUE sst2 labels are 0, 1"),
        ("the cat sat\t7", 3, r"the label \(label\) is '7'"),
    ],
)
def test_a_bad_tsv_row_is_one_error_naming_file_and_line(bad, line, says, tokenizers, tmp_path):
    dm = _sst2(tmp_path, ["sentence\tlabel", "a dog\t0", bad, "a cat\t1"], tokenizers)
    with pytest.raises(KDXError, match=rf"SST-2/train\.tsv:{line}: {says}"):
        dm.setup("fit")


def test_a_stray_tab_in_every_third_row_never_trains_on_fewer_rows(tokenizers, tmp_path):
    rows = [f"good\tmovie\t{i % 2}" if i % 3 == 2 else f"good movie\t{i % 2}" for i in range(300)]
    dm = _sst2(tmp_path, ["sentence\tlabel", *rows], tokenizers)
    with pytest.raises(KDXError, match=r"train\.tsv:4: 3 tab-separated fields"):
        dm.setup("fit")


def test_a_wrong_header_and_an_unknown_label_name_are_one_error(tokenizers, tmp_path):
    dm = _sst2(tmp_path, ["sentence\tlbl", "a dog\t0"], tokenizers)
    with pytest.raises(
        KDXError, match=r"train\.tsv:1: the header has no column\(s\) label \(it has sentence, lbl\)"
    ):
        dm.setup("fit")
    _, header, rows = FILES["rte"]
    folder = tmp_path / "r" / "RTE"
    folder.mkdir(parents=True)
    lines = ["\t".join(header), "\t".join(rows[0]), "\t".join([*rows[1][:3], "maybe"])]
    for name in ("train", "dev"):
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    dm = GLUEDataModule("rte", str(tmp_path / "r"), str(tmp_path / "c"), tokenizers[0])
    with pytest.raises(
        KDXError,
        match=r"RTE/train\.tsv:3: the label \(label\) is 'maybe'; GLUE rte labels are entailment, not_entailment",
    ):
        dm.setup("fit")


def test_a_damaged_glue_cache_is_rebuilt(tokenizers, tmp_path, caplog):
    import logging

    write_tsv(tmp_path / "glue", "rte")
    make = lambda: GLUEDataModule("rte", str(tmp_path / "glue"), str(tmp_path / "c"), tokenizers[0])  # noqa: E731
    clean = make()
    clean.setup("fit")
    [path] = (tmp_path / "c" / "glue").glob("rte-train-*.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="kdx.data.cache"):
        again = make()
        again.setup("fit")
    assert any(
        "GLUE rte train cache" in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records
    )
    for key, value in clean.train_set.encodings.items():
        assert torch.equal(value, again.train_set.encodings[key])


def test_a_damaged_synthetic_text_cache_and_tokenizer_are_rebuilt(tmp_path, caplog):
    import logging

    make = lambda: SyntheticTextDataModule(str(tmp_path), num_train=64, num_val=16, num_test=16)  # noqa: E731
    clean = make()
    clean.setup("fit")
    assert clean.input_kind == "tokens" and clean.examples_read == {"train": 64, "val": 16, "test": 16}
    (clean.tokenizer_dir / "tokenizer.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="kdx.data.cache"):
        again = make()
        again.setup("fit")
    [message] = [r.getMessage() for r in caplog.records]
    assert (
        "its companion tokenizer.json has 2 bytes where its record says" in message
        and "moved aside" in message
    )
    assert (clean.tokenizer_dir / "tokenizer.json").stat().st_size > 100
    # the same reviews and labels (WordPiece training on 64 reviews is not deterministic: the ids may differ)
    assert torch.equal(clean.train_set.labels, again.train_set.labels)
