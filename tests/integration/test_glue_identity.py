"""GLUE's data path: a tokenizer trained on the training split (``model.tokenizer=train``) whose size
the models' vocabulary follows, data named by content (a moved folder reuses the cached teacher,
tokenizer and tokenisation), a validation split held out of the training file (dev is the test),
and ``kdx-eval`` of a run on another folder, which trains nothing. Small TSVs under tmp_path."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import kdx.data.glue as glue
import kdx.teacher.auto as auto
from conftest import FAST, compose_train, run_cli, run_train
from kdx.data.glue import GLUEDataModule
from kdx.errors import KDXError
from kdx.models.hf import load_tokenizer
from kdx.pipeline.build import build, resolve_tokenizers, root_cause
from kdx.teacher import cached_teacher_path, teacher_key

GOOD = "good great fine lovely superb warm funny clever".split()
BAD = "bad awful dull boring weak cold flat stale".split()
FILLER = "the a movie film plot story cast was is this that very quite rather".split()


def sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(GOOD if label else BAD)]
    rng.shuffle(words)
    return " ".join(words)


def write_sst2(root, train_rows=60, dev_rows=12, seed=0):
    """An SST-2 folder in GLUE's TSV layout: unique sentences, labels alternating."""
    rng = random.Random(seed)
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, rows in (("train", train_rows), ("dev", dev_rows)):
        lines = ["sentence\tlabel"]
        seen = set()
        while len(lines) <= rows:
            label = len(lines) % 2
            text = f"{sentence(rng, label)} {len(lines)}"  # the row number keeps every sentence unique
            if text not in seen:
                seen.add(text)
                lines.append(f"{text}\t{label}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


def glue_overrides(root, *more, debug="fdr"):
    return [
        *FAST,
        f"debug={debug}",
        "dataset=glue",
        "dataset.task=sst2",
        f"dataset.root={root}",
        "dataset.tokenizer_vocab_size=120",
        "dataset.datamodule.val_size=8",
        "dataset.datamodule.max_length=16",
        "dataset.datamodule.batch_size=8",
        "teacher=bert_l2_h64",
        "student=bert_l2_h32",
        *more,
    ]


# -- the tokenizer trained on the training split -------------------------------------------------


def test_tokenizer_train_is_shared_and_the_models_vocabulary_follows_it(tmp_path):
    root = write_sst2(tmp_path / "glue")
    cfg = compose_train(
        glue_overrides(root, "method=kd", "student.model.tokenizer=train"), tmp_path, tmp_path / "cache"
    )
    assert cfg.teacher.model.tokenizer is None  # a config-built teacher naming none: train by default
    resolve_tokenizers(cfg)
    folder = cfg.student.model.tokenizer
    assert folder == cfg.teacher.model.tokenizer  # shared: one tokenisation
    assert folder.startswith(str(tmp_path / "cache" / "tokenizers" / "glue-sst2-"))
    size = len(load_tokenizer(folder))
    assert 30 < size <= 120 and cfg.student.model.vocab_size == cfg.teacher.model.vocab_size == size
    student = instantiate(cfg.student.model)
    assert student.vocab_size == size  # not BERT-base's 30,522
    dm = instantiate(cfg.dataset.datamodule)
    assert dm.tokenizers == {"": folder}


def test_a_relative_cache_folder_names_the_teacher_as_an_absolute_one_does(tmp_path, monkeypatch):
    """The trained tokenizer enters the teacher's key (kdx.teacher.key.portable): a run given the
    cache folder as a relative path must find the teacher a run given it absolute trained."""
    root = write_sst2(tmp_path / "glue")
    overrides = glue_overrides(root, "method=kd", "student.model.tokenizer=train")
    absolute = compose_train(overrides, tmp_path, tmp_path / "cache")
    resolve_tokenizers(absolute)
    monkeypatch.chdir(tmp_path)
    relative = compose_train(overrides, tmp_path, Path("cache"))
    resolve_tokenizers(relative)
    assert Path(relative.student.model.tokenizer).is_absolute()
    assert relative.student.model.tokenizer == absolute.student.model.tokenizer
    model = instantiate(absolute.teacher.model)
    assert teacher_key(relative, model) == teacher_key(absolute, model)


def test_a_config_built_vocabulary_smaller_than_its_tokenizer_is_one_error(tmp_path):
    root = write_sst2(tmp_path / "glue")
    cfg = compose_train(
        glue_overrides(root, "method=none", "teacher=none", "student.model.vocab_size=20"),
        tmp_path,
        tmp_path / "cache",
    )
    with pytest.raises(Exception) as caught:  # noqa: PT011 - Hydra wraps it: its root cause is the error
        build(cfg)
    error = root_cause(caught.value)
    assert isinstance(error, KDXError)
    assert "tokens but the model's vocabulary has 20; leave model.vocab_size null" in str(error)


def test_tokenizer_train_on_data_that_train_none_is_one_error(tmp_path):
    cfg = compose_train(
        ["dataset=synthetic_text", "student=bert_l2_h32", "student.model.tokenizer=train", "teacher=none"],
        tmp_path,
        tmp_path / "cache",
    )
    with pytest.raises(KDXError, match=r"does not train a tokenizer \(dataset=glue does\)"):
        build(cfg)


def test_a_damaged_trained_tokenizer_is_moved_aside_and_trained_again(tmp_path, caplog):
    root = write_sst2(tmp_path / "glue")
    make = lambda: GLUEDataModule("sst2", str(root), str(tmp_path / "c"), "train", tokenizer_vocab_size=80)  # noqa: E731
    folder = make().trained_tokenizer()
    good = (folder / "tokenizer.json").read_text()
    size = len(load_tokenizer(str(folder)))
    (folder / "tokenizer.json").write_text(good[: len(good) // 2])  # truncated
    with pytest.raises(KDXError, match="is not in the cache"):
        make().trained_tokenizer(create=False)  # kdx-eval never trains one
    assert make().trained_tokenizer() == folder
    # trained again (WordPiece breaks ties between equally frequent pieces in no fixed order: the
    # ids may differ, which is why keys name a trained tokenizer by its content)
    assert len(load_tokenizer(str(folder))) == size
    assert any("moved aside" in r.getMessage() for r in caplog.records)
    assert list(folder.parent.glob(f"{folder.name}.bad-*"))  # kept for a post-mortem
    # another vocabulary size is another tokenizer
    other = GLUEDataModule("sst2", str(root), str(tmp_path / "c"), "train", tokenizer_vocab_size=60)
    assert other.trained_tokenizer() != folder


# -- the held-out validation split ---------------------------------------------------------------


def test_validation_is_held_out_of_train_by_a_data_seed_and_dev_is_the_test(tmp_path):
    root = write_sst2(tmp_path / "glue", train_rows=50, dev_rows=7)

    def make(**kw):
        return GLUEDataModule(
            "sst2", str(root), str(tmp_path / "c"), "train", max_length=16, tokenizer_vocab_size=80, **kw
        )

    dm = make(val_size=10, val_seed=3)
    torch.manual_seed(123)  # the run's seed does not move the held-out rows
    dm.setup("fit")
    rows = lambda split: {tuple(r.tolist()) for r in split.encodings["input_ids"]}  # noqa: E731
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 7
    assert not rows(dm.train_set) & rows(dm.val_set)  # disjoint
    assert len(rows(dm.train_set) | rows(dm.val_set)) == 50  # together: the training file
    assert dm.examples_read == {"train": 50, "train_used": 40, "val": 10, "test": 7}
    torch.manual_seed(7)
    again = make(val_size=10, val_seed=3)
    again.setup("fit")
    assert rows(again.val_set) == rows(dm.val_set)
    other = make(val_size=10, val_seed=4)
    other.setup("fit")
    assert rows(other.val_set) != rows(dm.val_set)
    fraction = make(val_size=0.2, max_train_samples=5)
    fraction.setup("fit")
    assert fraction.examples_read == {"train": 50, "train_used": 5, "val": 10, "test": 7}
    papers = make(val_size=0)  # the GLUE papers' protocol: dev selects and is reported
    papers.setup("fit")
    assert papers.val_set is papers.test_set and len(papers.train_set) == 50
    with pytest.raises(KDXError, match=r"val_size=50 holds out 50 of the 50 training rows"):
        make(val_size=50).setup("fit")


def test_glue_defaults_hold_out_dev_sized_validation_and_prokt_keeps_the_papers_protocol(tmp_path):
    cfg = compose_train(["dataset=glue", "dataset.task=sst2"], tmp_path, tmp_path)
    assert cfg.dataset.datamodule.val_size == 872 and cfg.dataset.datamodule.tokenizer_vocab_size == 8000
    assert (
        compose_train(["dataset=glue", "dataset.task=rte"], tmp_path, tmp_path).dataset.datamodule.val_size
        == 277
    )
    prokt = compose_train(["experiment=prokt_glue/sst2"], tmp_path, tmp_path)
    assert prokt.dataset.datamodule.val_size == 0


# -- data named by content -----------------------------------------------------------------------


def teacher_path(overrides, output_dir, cache):
    cfg = compose_train(overrides, output_dir, cache)
    resolve_tokenizers(cfg)  # as the builder does before it provides the teacher
    return cached_teacher_path(cfg)


def test_a_moved_glue_folder_reuses_the_cached_teacher_tokenizer_and_tokenisation(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = write_sst2(tmp_path / "a" / "glue")
    reads, trainings = [], []
    real_read, real_train = glue.read_split, auto.train_teacher
    monkeypatch.setattr(glue, "read_split", lambda *a: reads.append(a[2][0]) or real_read(*a))
    monkeypatch.setattr(auto, "train_teacher", lambda *a, **k: trainings.append(1) or real_train(*a, **k))
    record = run_train(glue_overrides(first, "method=kd"), tmp_path / "run1", cache)
    assert record["status"] == "ok" and trainings == [1]
    assert reads  # the tokenizer and the tokenisation read the files once
    assert record["data/examples"] == {"train": 60, "train_used": 52, "val": 8, "test": 12}
    path = teacher_path(glue_overrides(first, "method=kd"), tmp_path, cache)
    entries = sorted(p.name for p in (cache / "glue").glob("*.pt"))
    moved = tmp_path / "b" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    reads.clear()
    again = run_train(glue_overrides(moved, "method=kd"), tmp_path / "run2", cache)
    assert again["status"] == "ok"
    assert trainings == [1] and again["teacher/source"] == "cache"  # no second teacher
    assert reads == []  # neither a tokenizer nor a tokenisation was built again
    assert sorted(p.name for p in (cache / "glue").glob("*.pt")) == entries
    assert teacher_path(glue_overrides(moved, "method=kd"), tmp_path, cache) == path
    # other content is other data
    (moved / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nquite good film\t1\n")
    assert teacher_path(glue_overrides(moved, "method=kd"), tmp_path, cache) != path


# -- kdx-eval on another folder ------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_kdx_eval_of_a_run_on_another_folder_trains_nothing(tmp_path, cache_dir):
    cache = tmp_path / "cache"
    write_sst2(tmp_path / "glue")
    train = run_cli(
        "kdx-train", *glue_overrides("glue", "method=kd", debug="limit"), root=tmp_path, cache=cache
    )
    assert train.returncode == 0, train.stderr[-3000:]
    (run_dir,) = tmp_path.glob("logs/**/train/runs/*")
    record = json.loads((run_dir / "metrics.json").read_text())
    other = write_sst2(tmp_path / "other", train_rows=30, dev_rows=5, seed=9)  # other files altogether
    before = sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if "teachers" in p.parts or "tokenizers" in p.parts
    )
    proc = run_cli("kdx-eval", f"run={run_dir}", f"dataset.root={other}", root=tmp_path, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if "teachers" in p.parts or "tokenizers" in p.parts
    )
    assert after == before  # no teacher, no tokenizer trained
    result = json.loads(max(tmp_path.glob("logs/eval/runs/*/eval.json"), key=os.path.getmtime).read_text())
    assert result["ckpt"] == record["student/best_ckpt"] and "teacher_skipped" not in result
    assert "fidelity/kl" in result  # against the run's own teacher
    # the teacher's file gone: the student alone, said so, still nothing trained
    for file in (cache / "teachers").glob("*.pt"):
        file.rename(file.with_suffix(".gone"))
    proc = run_cli("kdx-eval", f"run={run_dir}", f"dataset.root={other}", root=tmp_path, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the teacher part is skipped" in proc.stderr
    skipped = json.loads(max(tmp_path.glob("logs/eval/runs/*/eval.json"), key=os.path.getmtime).read_text())
    assert "is gone or changed" in skipped["teacher_skipped"]
    assert not list((cache / "teachers").glob("*.pt"))


def test_the_sst2_experiment_holds_the_text_recipe_prokt_included(tmp_path):
    prokt = compose_train(["experiment=sst2/table", "method=prokt"], tmp_path, tmp_path)
    assert prokt.method.teacher_optim.optimizer._target_ == "torch.optim.AdamW"  # not MNIST-1D's Adam 1e-2
    assert prokt.method.teacher_optim.interval == "step"
    assert prokt.optim.optimizer._target_ == "torch.optim.AdamW"
    assert prokt.dataset.datamodule.val_size == 872  # selected on held-out rows, dev reported
    kd = compose_train(["experiment=sst2/table", "method=kd"], tmp_path, tmp_path)
    assert kd.teacher.train.optim.optimizer._target_ == "torch.optim.AdamW"
