"""Every config in conf/ composes, and a misspelt or ill-typed method key fails at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_train

GROUPS = ["dataset", "teacher", "student", "method", "optim", "trainer", "logger", "callbacks", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


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
