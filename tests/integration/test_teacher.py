"""Teachers: auto-train and reuse, safe loading, and one-line errors for every mismatch."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, compose_train, run_train
from kdx.errors import KDXError
from kdx.models.small import CNN1D, MLP
from kdx.teacher import cached_teacher_path, load_weights


def test_auto_teacher_is_trained_once_then_reused(tmp_path, cache_dir):
    first = run_train([*FAST, "teacher.train.seed=7"], tmp_path / "a", cache_dir)
    second = run_train([*FAST, "teacher.train.seed=7"], tmp_path / "b", cache_dir)
    assert first["teacher/source"] == "trained"
    assert second["teacher/source"] == "cache"
    assert first["teacher/sha256"] == second["teacher/sha256"]
    cfg = compose_train([*FAST, "teacher.train.seed=7"], tmp_path, cache_dir)
    assert cached_teacher_path(cfg).is_file()
    assert json.loads(cached_teacher_path(cfg).with_suffix(".json").read_text())["config"]["name"] == "cnn1d"
    # a different recipe is a different teacher
    other = compose_train([*FAST, "teacher.train.seed=8"], tmp_path, cache_dir)
    assert cached_teacher_path(other) != cached_teacher_path(cfg)


def test_teacher_from_a_kdx_lightning_checkpoint(tmp_path):
    # a teacher trained as a kdx student (method=none) is reused through its Lightning checkpoint
    teacher = CNN1D(10, (1, 40))
    ckpt = {"state_dict": {f"student.model.{k}": v for k, v in teacher.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "run.ckpt")
    fresh = CNN1D(10, (1, 40))
    load_weights(fresh, tmp_path / "run.ckpt")
    for key, value in teacher.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(KDXError, match=r"teacher checkpoint not found: .*nope\.pt.*teacher\.ckpt=auto"):
        load_weights(CNN1D(10, (1, 40)), tmp_path / "nope.pt")


def test_wrong_architecture_is_one_line(tmp_path):
    torch.save(MLP(10, (1, 40)).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(KDXError, match=r"does not fit teacher model CNN1D.*missing keys") as err:
        load_weights(CNN1D(10, (1, 40)), tmp_path / "mlp.pt")
    assert "\n" not in str(err.value)


def test_class_count_mismatch_is_named(tmp_path):
    torch.save(CNN1D(10, (1, 40)).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(KDXError, match=r"class-count mismatch: the checkpoint has 10 classes, the model 5"):
        load_weights(CNN1D(5, (1, 40)), tmp_path / "ten.pt")


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": object()}, tmp_path / "evil.pt")
    match = r"evil.pt holds Python objects besides tensors.*torch: Unsupported global: GLOBAL object was not an allowed global"
    with pytest.raises(KDXError, match=match) as err:
        load_weights(CNN1D(10, (1, 40)), tmp_path / "evil.pt")
    assert "weights_only=False" not in str(err.value)  # torch's advice, which kdx never follows


def test_teacher_below_min_acc_stops_the_run(tmp_path, cache_dir):
    with pytest.raises(KDXError, match=r"teacher.min_acc=1.01"):
        run_train([*FAST, "teacher.min_acc=1.01"], tmp_path, cache_dir)


def test_student_class_count_mismatch(tmp_path, cache_dir):
    with pytest.raises(KDXError, match=r"student=mlp has 7 classes but dataset=mnist1d has 10"):
        run_train([*FAST, "student.model.num_classes=7"], tmp_path, cache_dir)


def test_teacher_output_class_mismatch(tmp_path, cache_dir):
    # a teacher checkpoint path that fits a 10-class model, used with a 4-class data set
    torch.save(CNN1D(10, (1, 40)).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(KDXError, match="class-count mismatch"):
        run_train(
            [*FAST, "dataset=synthetic", "dataset.num_classes=4", f"teacher.ckpt={tmp_path / 'ten.pt'}"],
            tmp_path,
            cache_dir,
        )


def test_teacher_trains_on_its_own_data_when_the_recipe_says_so(tmp_path, cache_dir):
    """teacher.train.dataset merges over the student's dataset for the teacher's run and key only:
    students on different labelled budgets share one teacher trained on the whole split."""
    from kdx.teacher.auto import teacher_run_config

    whole = "teacher.train.dataset={datamodule:{num_samples:5500}}"
    small = compose_train([*FAST, "dataset.datamodule.num_samples=3000", whole], tmp_path, cache_dir)
    smaller = compose_train([*FAST, "dataset.datamodule.num_samples=2000", whole], tmp_path, cache_dir)
    assert small.dataset.datamodule.num_samples == 3000  # the student's run is unchanged
    assert teacher_run_config(small, tmp_path / "t").dataset.datamodule.num_samples == 5500
    assert cached_teacher_path(small) == cached_teacher_path(smaller)
    plain = compose_train([*FAST, "dataset.datamodule.num_samples=3000"], tmp_path, cache_dir)
    other = compose_train([*FAST, "dataset.datamodule.num_samples=2000"], tmp_path, cache_dir)
    assert cached_teacher_path(plain) != cached_teacher_path(other)
    assert cached_teacher_path(plain) != cached_teacher_path(small)
