"""Every config option composes (conf/'s files and the options kdx.configs generates), conf/ stays
small, and a misspelt or ill-typed method key fails at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_train
from kdx.cli import options
from kdx.configs import generated_options, method_names, model_names, zoo_model_names
from kdx.methods import METHODS

GROUPS = ["dataset", "teacher", "student", "method", "optim", "trainer", "logger", "callbacks", "debug"]


def _options(group: str) -> list[str]:
    return options(group)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}"], tmp_path, tmp_path / "cache")
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group != "debug":  # debug files are global overrides, the others fill their own node
        assert container[group] is not None


def test_groups_are_not_empty():
    for group in GROUPS:
        assert _options(group), group


def test_eval_and_bench_configs_compose(tmp_path):
    for name in ("eval", "bench"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=name, overrides=["ckpt_path=x.pt"] if name == "eval" else [])
        assert cfg.task_name == name
    GlobalHydra.instance().clear()


def test_misspelt_method_key_fails_at_compose_time(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["method=kd", "method.alpah=0.5"], tmp_path, tmp_path)
    assert "alpah" in str(err.value) + str(err.value.__cause__)


def test_misspelt_key_inside_an_experiment_file_is_caught_by_the_schema(tmp_path):
    # a YAML file (not the command line) that misspells a method key: the typed schema refuses it
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\nmethod:\n  alpah: 0.5\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(
            [f"hydra.searchpath=[file://{tmp_path}]", "method=kd", "experiment=typo"], tmp_path, tmp_path
        )
    assert "alpah" in str(err.value) + str(err.value.__cause__)


def test_ill_typed_method_value_fails_at_compose_time(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["method=kd", "method.temperature=hot"], tmp_path, tmp_path)
    assert "temperature" in str(err.value) + str(err.value.__cause__)


def test_generated_options_cover_every_model_method_and_search_space():
    assert method_names() == tuple(sorted(METHODS))  # read from the sources without importing torch
    assert set(model_names()) <= set(options("student"))
    assert set(zoo_model_names()) <= set(options("teacher"))
    assert set(METHODS) <= set(options("method"))
    assert {f"{m}_optuna" for m in METHODS} <= set(options("hparams_search"))
    # a generated option is one no file provides
    for group in ("student", "teacher", "method", "hparams_search"):
        assert not any((Path(CONF_DIR) / group / f"{o}.yaml").exists() for o in generated_options(group))


@pytest.mark.parametrize("option", options("hparams_search"))
def test_every_search_space_composes_with_its_method(option, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hparams_search={option}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    method = option.removesuffix("_optuna")
    assert cfg.method._target_ == METHODS[method].__module__ + "." + METHODS[method].__qualname__
    assert cfg.hydra.sweeper.study_name == f"train-{method}" and cfg.hydra.sweeper.params
    assert all(key.split(".")[0] in ("method", "optim") for key in cfg.hydra.sweeper.params)


def test_an_experiment_rows_tuned_values_apply_only_to_that_method(tmp_path):
    row = "experiment=crd_cifar100/vgg13_vgg8"
    assert compose_train([row, "method=dkd"], tmp_path, tmp_path).method.beta == 6.0
    assert compose_train(["method=dkd"], tmp_path, tmp_path).method.beta == 8.0  # DKD's own default
    assert compose_train([row, "method=dkd", "method.beta=3"], tmp_path, tmp_path).method.beta == 3.0
    assert "beta" not in compose_train([row], tmp_path, tmp_path).method  # the row's KD has no β


def test_method_signatures_read_from_sources_match_the_typed_schemas():
    from kdx.configs import _method_sources, method_signatures
    from kdx.methods.base import schema_of

    signatures = method_signatures()  # what the front door knows without torch
    assert set(signatures) == set(METHODS)
    for name, cls in METHODS.items():
        typed = {f for f in schema_of(cls).__dataclass_fields__ if f != "_target_"}
        assert set(signatures[name]) == typed, name
    assert signatures["kd"] == {"alpha": 0.9, "temperature": 4.0}  # kd.py's __init__ defaults
    targets = {name: target for name, (target, _) in _method_sources().items()}
    assert targets == {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in METHODS.items()}


def test_any_model_is_a_teacher_without_a_wrapper_file(tmp_path):
    cfg = compose_train(["teacher=mlp"], tmp_path, tmp_path)
    assert cfg.teacher.name == "mlp" and cfg.teacher.model._target_ == cfg.student.model._target_
    assert cfg.teacher.ckpt == "auto" and cfg.teacher.train.epochs == 240  # conf/teacher/_recipe.yaml
    assert cfg.teacher.train.optim.optimizer._target_ == "torch.optim.Adam"
    zoo = compose_train(["teacher=resnet8"], tmp_path, tmp_path)  # a CIFAR zoo model: the CRD recipe
    assert zoo.teacher.train.optim.optimizer._target_ == "torch.optim.SGD"
    named = compose_train(["teacher=mlp", "teacher.name=mlp_big"], tmp_path, tmp_path)
    assert named.teacher.name == "mlp_big"


def test_digits_carries_the_learning_rate_it_was_measured_with(tmp_path):
    digits = compose_train(["dataset=digits"], tmp_path, tmp_path)
    assert digits.optim.optimizer.lr == 1e-3 and digits.teacher.train.optim.optimizer.lr == 1e-3
    assert compose_train([], tmp_path, tmp_path).optim.optimizer.lr == 0.01  # MNIST-1D's own
    assert (
        compose_train(["dataset=digits", "optim.optimizer.lr=0.5"], tmp_path, tmp_path).optim.optimizer.lr
        == 0.5
    )
    assert compose_train(["dataset=digits", "optim=sgd"], tmp_path, tmp_path).optim.optimizer.lr == 0.1


@pytest.mark.parametrize("debug", ["fdr", "limit"])
def test_debug_runs_land_in_their_own_folder(debug):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        plain = compose(config_name="train")
        cfg = compose(config_name="train", overrides=[f"debug={debug}"])
    assert cfg.paths.log_dir == f"{plain.paths.log_dir}/debug"
