"""Nothing read from a cache is trusted without a check: a damaged teacher-output
cache, MNIST-1D data file or tokenised-text cache is detected on the next run, moved aside with the
reason, and rebuilt to the same figures; a killed writer's temporaries are removed; a read-only cache
is one line (and the live teacher where the teacher outputs are missing)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from filelock import FileLock

import kdx.data.cache as data_cache
import kdx.teacher_outputs as teacher_outputs
from conftest import run_train
from kdx.data.mnist1d import MNIST1DDataModule
from kdx.errors import KDXError
from kdx.models.base import EMBEDDING, LOGITS
from kdx.teacher_outputs import TeacherOutputCache
from kdx.utils import file_sha256
from test_teacher_cache import SHORT, _Data, _teacher

READS = frozenset({LOGITS, EMBEDDING})


def _fill(root) -> TeacherOutputCache:
    cache = TeacherOutputCache("exact", root, {"teacher": "cnn1d"}, batch_size=7)
    cache.prepare(_teacher(), READS, _Data())
    return cache


def _arrays(cache: TeacherOutputCache) -> dict[str, np.ndarray]:
    return {part: np.array(a) for part, a in cache.arrays.items()}


def _garbage(path):  # half of the rows overwritten with finite random values; the file keeps its size
    a = np.load(path / "logits.npy", mmap_mode="r+")
    a[len(a) // 2 :] = np.random.default_rng(0).normal(size=a[len(a) // 2 :].shape).astype(a.dtype)
    a.flush()
    del a


def _nan(path):
    with open(path / "logits.npy", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(np.full(16, np.nan, np.float32).tobytes())


def _truncate(path):
    file = path / "logits.npy"
    os.truncate(file, file.stat().st_size // 2)


def _no_meta(path):
    (path / "meta.json").unlink()


def _garbage_meta(path):
    (path / "meta.json").write_text("{ this is not json")


CORRUPTIONS = {
    "garbage": (_garbage, "logits.npy fails its sha256 checksum"),
    "nan": (_nan, "logits.npy fails its sha256 checksum"),
    "truncated": (_truncate, r"logits.npy has \d+ bytes where its record says \d+ \(truncated"),
    "no_meta": (_no_meta, "has no meta.json"),
    "garbage_meta": (_garbage_meta, "has an unreadable meta.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_teacher_output_cache_is_moved_aside_and_rebuilt(case, tmp_path, caplog):
    corrupt, reason = CORRUPTIONS[case]
    clean = _fill(tmp_path)
    assert clean.status == "filled" and clean.problem is None
    expected, path = _arrays(clean), clean.path
    del clean  # close the memory maps
    corrupt(path)
    with caplog.at_level(logging.WARNING, logger="kdx.teacher_outputs"):
        again = _fill(tmp_path)
    assert again.status == "rebuilt" and again.path == path
    assert re.search(reason, again.problem)
    [message] = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert str(path) in message and "filling it again" in message
    [bad] = path.parent.glob(f"{path.name}.bad-*")
    assert bad.is_dir() and bad.name in message  # kept for a post-mortem
    for part, array in _arrays(again).items():
        np.testing.assert_array_equal(array, expected[part])  # the same figures as a clean cache
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdx.teacher_outputs"):
        third = _fill(tmp_path)
    assert third.status == "reused" and not caplog.records  # said once: the rebuilt entry passes


def test_a_killed_fill_leaves_no_temporary_folder_behind(tmp_path, caplog):
    clean = _fill(tmp_path)
    path, expected = clean.path, _arrays(clean)
    del clean
    shutil.rmtree(path)
    killed = path.parent / f".{path.name}.k1ll3d.tmp"  # a fill killed half-way
    killed.mkdir()
    (killed / "logits.npy").write_bytes(b"\x93NUMPY half")
    other = path.parent / ".cnn1d-0123456789ab.w0rk.tmp"  # another key's fill, still running
    other.mkdir()
    with FileLock(str(path.parent / "cnn1d-0123456789ab.lock")):
        with caplog.at_level(logging.WARNING, logger="kdx.teacher_outputs"):
            again = _fill(tmp_path)
        assert other.is_dir()  # a live writer's temporary is left alone
    assert not killed.exists() and again.status == "filled"
    assert any(str(killed) in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)
    for part, array in _arrays(again).items():
        np.testing.assert_array_equal(array, expected[part])
    _fill(tmp_path)  # nobody holds the other key's lock any more: its temporary goes too
    assert not other.exists()


def test_a_read_only_cache_runs_the_live_teacher_with_one_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(teacher_outputs, "is_writable", lambda folder: False)
    with caplog.at_level(logging.WARNING, logger="kdx.teacher_outputs"):
        cache = _fill(tmp_path)  # no entry: nothing can be filled
    assert (
        cache.status == "live" and cache.read(torch.tensor([0, 1]), 0) is None
    )  # the module runs the teacher
    [message] = [r.getMessage() for r in caplog.records]
    assert "holds no outputs for this run" in message and "is read-only: the teacher runs live" in message
    assert not (tmp_path / "teacher_outputs").exists() or not any((tmp_path / "teacher_outputs").iterdir())
    monkeypatch.undo()
    good = _fill(tmp_path)
    path = good.path
    del good
    monkeypatch.setattr(teacher_outputs, "is_writable", lambda folder: False)
    assert _fill(tmp_path).status == "reused"  # a sound entry is read from a read-only cache
    _garbage(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdx.teacher_outputs"):
        damaged = _fill(tmp_path)
    assert damaged.status == "live" and "sha256" in damaged.problem
    [message] = [r.getMessage() for r in caplog.records]
    assert str(path) in message and "fails its sha256 checksum" in message and "read-only" in message
    assert path.is_dir() and not list(path.parent.glob("*.bad-*"))  # nothing moved in a read-only cache


def test_a_run_on_a_damaged_or_read_only_teacher_output_cache_ends_ok_with_the_clean_figures(
    tmp_path, cache_dir, monkeypatch, caplog
):
    overrides = [*SHORT, "teacher.cache=exact"]
    clean = run_train(overrides, tmp_path / "clean", cache_dir)
    [entry] = sorted(
        (cache_dir / "teacher_outputs").glob("cnn1d-*/meta.json"), key=lambda p: p.stat().st_mtime
    )[-1:]
    entry = entry.parent
    _garbage(entry)
    with caplog.at_level(logging.WARNING, logger="kdx.teacher_outputs"):
        repaired = run_train(overrides, tmp_path / "repaired", cache_dir)
    assert repaired["status"] == "ok" and repaired["student/acc"] == clean["student/acc"]
    assert any("fails its sha256 checksum" in r.getMessage() for r in caplog.records)
    assert list(entry.parent.glob(f"{entry.name}.bad-*"))
    # read-only and without this run's outputs: the live teacher, the same figures, no PermissionError
    aside = tmp_path / "aside"
    os.replace(entry, aside)
    monkeypatch.setattr(teacher_outputs, "is_writable", lambda folder: False)
    try:
        live = run_train(overrides, tmp_path / "live", cache_dir)
    finally:
        os.replace(aside, entry)
    assert live["status"] == "ok" and live["student/acc"] == clean["student/acc"]


# -- MNIST-1D --------------------------------------------------------------------------------


def _mnist(root) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(str(root), num_samples=300, val_fraction=0.1, batch_size=32)
    dm.setup("fit")
    return dm


def _splits(dm):
    return [s.base.tensors[0] for s in (dm.train_set, dm.val_set, dm.test_set)]


MNIST_CORRUPTIONS = {
    "truncated": (lambda p: os.truncate(p, p.stat().st_size // 2), "(truncated or overwritten)"),
    "bytes": (lambda p: p.write_bytes(p.read_bytes()[:-8] + b"\x00" * 8), "fails its sha256 checksum"),
    "no_record": (lambda p: p.with_name(p.name + ".json").unlink(), "has no record"),
    "garbage_record": (
        lambda p: p.with_name(p.name + ".json").write_text("[1, 2"),
        "record .* is unreadable",
    ),
}


@pytest.mark.parametrize("case", sorted(MNIST_CORRUPTIONS))
def test_a_damaged_mnist1d_file_is_moved_aside_and_generated_again(case, tmp_path, caplog):
    corrupt, reason = MNIST_CORRUPTIONS[case]
    clean = _mnist(tmp_path)
    assert clean.examples_read == {"train": 216, "val": 24, "test": 60}
    path = clean.cache_path
    corrupt(path)
    with caplog.at_level(logging.WARNING, logger="kdx.data.cache"):
        again = _mnist(tmp_path)
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"MNIST-1D cache {path} ") and "moved aside to" in message
    assert re.search(reason, message)
    assert list(path.parent.glob(f"{path.name}.bad-*"))
    for a, b in zip(_splits(clean), _splits(again)):
        assert torch.equal(a, b)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdx.data.cache"):
        _mnist(tmp_path)
    assert not caplog.records


def test_mnist1d_stale_temporary_is_removed_and_read_only_cache_is_one_line(tmp_path, caplog, monkeypatch):
    clean = _mnist(tmp_path)
    path = clean.cache_path
    stale = path.parent / f".{path.name}.d34d.tmp"
    stale.write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING, logger="kdx.data.cache"):
        _mnist(tmp_path)
    assert not stale.exists() and any(str(stale) in r.getMessage() for r in caplog.records)
    os.truncate(path, 100)
    monkeypatch.setattr(data_cache, "is_writable", lambda folder: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdx.data.cache"):
        again = _mnist(tmp_path)
    [message] = [r.getMessage() for r in caplog.records]
    assert str(path) in message and "is read-only: built in memory for this run" in message
    assert path.stat().st_size == 100  # nothing moved or written
    for a, b in zip(_splits(clean), _splits(again)):
        assert torch.equal(a, b)


def test_checksum_cost_on_the_mnist1d_cache_is_negligible(tmp_path):
    import time

    dm = MNIST1DDataModule(str(tmp_path), num_samples=5000, batch_size=32)  # the default size
    dm.setup("fit")
    start = time.perf_counter()
    for _ in range(10):
        file_sha256(dm.cache_path)
    per_check = (time.perf_counter() - start) / 10
    assert per_check < 0.05, f"{per_check * 1e3:.1f} ms per check of {dm.cache_path.stat().st_size} bytes"


def test_record_holds_checksum_shape_and_dtype(tmp_path):
    dm = _mnist(tmp_path)
    record = json.loads(dm.cache_path.with_name(dm.cache_path.name + ".json").read_text())
    assert record["file"]["sha256"] == file_sha256(dm.cache_path)
    assert record["tensors"]["x"] == {"shape": [240, 40], "dtype": "torch.float32"}


def test_a_damaged_entry_with_companions_in_a_read_only_cache_is_one_kdx_error(tmp_path, monkeypatch):
    path = tmp_path / "c" / "data.pt"
    companion = tmp_path / "c" / "tok"

    def build():
        companion.mkdir(parents=True, exist_ok=True)
        (companion / "vocab.txt").write_text("a b c")
        return {"x": torch.arange(3)}

    data_cache.load_or_build(path, build, what="toy", companions=[companion])
    (companion / "vocab.txt").write_text("a b d")
    monkeypatch.setattr(data_cache, "is_writable", lambda folder: False)
    with pytest.raises(
        KDXError, match=r"toy cache .*data.pt its companion vocab.txt fails its sha256 .* is read-only"
    ):
        data_cache.load_or_build(path, build, what="toy", companions=[companion])
