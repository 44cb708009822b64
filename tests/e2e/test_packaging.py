"""What an installed kdx needs: every package it imports declared, every subpackage and config in
the wheel, the configs found through the package (pkg://kdx.conf), the version written once.

The full check — build a wheel, install it in a fresh venv, run kdx-train from another folder — is
`make package-check` (scripts/check_wheel.sh), which .ci/run runs after the tests.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import tomllib
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import kdx
from conftest import CONF_DIR, ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SRC = ROOT / "src"


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _declared() -> set[str]:
    return {
        _normalise(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in PYPROJECT["project"]["dependencies"]
    }


def _imported_top_level_names() -> dict[str, str]:
    """Top-level names of every import in src/kdx (lazy ones inside functions included) -> a file."""
    names: dict[str, str] = {}
    for path in sorted((SRC / "kdx").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module]
            else:
                continue
            for name in found:
                names.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return names


def test_every_imported_package_is_a_declared_dependency():
    owners = packages_distributions()  # import name -> distributions that provide it
    undeclared = {}
    for name, where in _imported_top_level_names().items():
        if name in sys.stdlib_module_names or name in ("kdx", "__future__"):
            continue
        distributions = {_normalise(d) for d in owners.get(name, [name])}
        if not distributions & _declared():
            undeclared[name] = (sorted(distributions), where)
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def test_wheel_lists_every_subpackage_of_src():
    # pyproject.toml lists the packages by hand (kdx.conf is mapped from conf/, which find cannot do)
    on_disk = {".".join(p.parent.relative_to(SRC).parts) for p in (SRC / "kdx").rglob("__init__.py")} | {
        "kdx.conf"
    }
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == on_disk


def test_conf_is_the_package_kdx_conf():
    import kdx.conf

    from kdx.train import CONFIG_DIR

    assert CONFIG_DIR == "pkg://kdx.conf"
    # in this (editable) install the package is the clone's top-level conf/, the folder tests compose from
    assert Path(kdx.conf.__file__).parent.resolve() == Path(CONF_DIR).resolve()
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["kdx.conf"] == ["**/*.yaml"]


def _compose(initialize, overrides: list[str]) -> dict:
    GlobalHydra.instance().clear()
    try:
        with initialize():
            return OmegaConf.to_container(compose(config_name="train", overrides=overrides))
    finally:
        GlobalHydra.instance().clear()


def test_configs_compose_through_the_package_as_from_the_folder():
    overrides = ["method=none", "dataset=synthetic", "student=resnet8"]
    through_package = _compose(
        lambda: initialize_config_module(config_module="kdx.conf", version_base="1.3"), overrides
    )
    from_folder = _compose(lambda: initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"), overrides)
    assert (
        through_package["dataset"]["name"] == "synthetic" and through_package["student"]["name"] == "resnet8"
    )
    assert through_package == from_folder


def test_version_is_written_once():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kdx.__version__"}
    assert version("kdx") == kdx.__version__  # the installed metadata was built from it


def test_py_typed_is_declared_and_exists():
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["kdx"]
    assert (SRC / "kdx" / "py.typed").is_file()
