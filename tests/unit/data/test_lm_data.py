"""Language-modelling data: packing, padding targets, local text sources, the cached entry."""

from __future__ import annotations

import pytest
import torch

from kdx.data.lm import IGNORE_INDEX, BlockDataset, LMDataModule, pack, read_documents
from kdx.errors import KDXError


def test_pack_ends_documents_and_pads_the_last_block():
    # stream 1 2 <eos> 3 <eos> in blocks of 3 (2 inputs + the last target): [1 2 9] [3 9 pad]
    blocks, lengths = pack([[1, 2], [3]], eos=9, pad=0, block_size=2)
    assert blocks.tolist() == [[1, 2, 9], [3, 9, 0]] and lengths.tolist() == [3, 2]
    x, y, index = BlockDataset(blocks, lengths)[1]
    assert x["input_ids"].tolist() == [3, 9] and x["attention_mask"].tolist() == [1, 0]
    assert y.tolist() == [9, IGNORE_INDEX] and index == 1  # the padding predicts nothing
    x, y, _ = BlockDataset(blocks, lengths)[0]
    assert (
        x["input_ids"].tolist() == [1, 2] and y.tolist() == [2, 9] and x["attention_mask"].tolist() == [1, 1]
    )
    # what chance is judged on: every target read, the padding's none ([2 9] and [9])
    assert BlockDataset(blocks, lengths).target_tokens().tolist() == [2, 9, 9]


def test_documents_from_lines_a_tsv_column_and_a_folder(tmp_path):
    lines = tmp_path / "docs.txt"
    lines.write_text("one doc\n\nanother doc\nthird\n")
    assert read_documents(str(lines)) == ["one doc", "another doc", "third"]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\na good film \t1\na bad film\t0\nfine\t1\n")
    assert read_documents(str(tsv), "sentence") == ["a good film", "a bad film", "fine"]
    with pytest.raises(KDXError, match="no column 'text'"):
        read_documents(str(tsv), "text")
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"document {i}\n")
    assert read_documents(str(folder)) == ["document 0", "document 1", "document 2"]
    with pytest.raises(KDXError, match="neither a file nor a folder"):
        read_documents(str(tmp_path / "missing"))


def test_generated_corpus_is_built_once_and_reused(tmp_path):
    def module():
        return LMDataModule(
            str(tmp_path), num_train=200, num_val=20, num_test=20, block_size=16, vocab_size=128
        )

    first = module()
    first.setup()
    assert first.examples_read == {"train": 200, "val": 20, "test": 20}
    x, y, _ = first.train_set[0]
    assert x["input_ids"].shape == (16,) and int(x["input_ids"].max()) < 128
    assert torch.equal(x["input_ids"][1:], y[:-1])  # y is the next token
    again = module()
    again.setup()
    assert torch.equal(again.train_set.blocks, first.train_set.blocks)
    assert (first.folder / "tokenizer").is_dir()


def test_a_vocabulary_too_small_for_the_tokenizer_is_one_clear_error(tmp_path):
    data = LMDataModule(str(tmp_path), num_train=100, num_val=10, num_test=10, vocab_size=8)
    with pytest.raises(KDXError, match="dataset.vocab_size"):
        data.setup()


def test_local_text_is_split_and_tokenised(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the film number {i} was good" for i in range(60)))
    data = LMDataModule(str(tmp_path / "cache"), source=str(corpus), vocab_size=64, block_size=8)
    data.setup()
    assert data.examples_read == {"val": 3, "test": 3, "train": 54}
    assert len(data.val_set) >= 1 and len(data.train_set) > len(data.val_set)


def test_local_text_is_named_by_its_bytes_wherever_it_lies(tmp_path):
    text = "\n".join(f"the film number {i} was good" for i in range(30))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "corpus.txt").write_text(text)
    one, two = (LMDataModule(str(tmp_path / "cache"), source=str(tmp_path / f / "corpus.txt")) for f in "ab")
    assert one.data_fingerprint() == two.data_fingerprint() and one.folder == two.folder
    (tmp_path / "b" / "corpus.txt").write_text(text + "\nanother line")
    assert (
        LMDataModule(str(tmp_path / "cache"), source=str(tmp_path / "b" / "corpus.txt")).data_fingerprint()
        != one.data_fingerprint()
    )
    assert LMDataModule(str(tmp_path / "cache")).data_fingerprint() is None  # generated: its config names it
