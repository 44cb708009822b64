"""A researcher's first hour: README commands compose, --help is instant, resume continues its run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from conftest import run_cli, run_train
from kdx.cli import conf_root, help_text, misspelt_group, options
from kdx.errors import KDXError
from kdx.front_door import run_choices
from kdx.models.registry import list_models

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_OF = {"kdx-train": "train", "kdx-eval": "eval", "kdx-bench": "bench"}


def _split_top_level(value: str) -> list[str]:
    """``a,b`` → [a, b], leaving commas inside brackets alone (``[1,40]``)."""
    parts, depth, current = [], 0, ""
    for ch in value:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def documented_commands() -> list[tuple[str, str]]:
    """Every kdx-train/kdx-eval/kdx-bench line inside a bash block of the README and docs/."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip().removeprefix("$ ")
                if line.split(" ", 1)[0] in CONFIG_OF:
                    found.append((f"{doc.name}: {line}", line))
    return found


def overrides_of(line: str) -> tuple[str, list[str]]:
    words = shlex.split(line.replace("\\\n", " "))
    tool, args = words[0], words[1:]
    overrides = []
    for i, arg in enumerate(args):
        if arg == "--config-dir":  # the user's own config folder joins the search path
            overrides.append(f"hydra.searchpath=[file://{ROOT / args[i + 1]}]")
        if arg in ("-m", "--multirun") or arg.startswith("--") or (i and args[i - 1] == "--config-dir"):
            continue
        arg = arg.replace("$PWD", str(ROOT))
        key, _, value = arg.partition("=")
        overrides.append(f"{key}={_split_top_level(value)[0]}" if "=" in arg else arg)
    return CONFIG_OF[tool], overrides


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("where,line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_composes(where, line, tmp_path):
    config_name, overrides = overrides_of(line)
    overrides = [o.replace("<", "").replace(">", "") for o in overrides]
    placeholders = [o for o in overrides if o.startswith("ckpt_path=")]
    for old in placeholders:  # paths to files the reader has after a run: a stand-in file
        stand_in = tmp_path / "stand_in.ckpt"
        stand_in.write_bytes(b"")
        overrides[overrides.index(old)] = f"ckpt_path={stand_in}"
    for old in [o for o in overrides if o.startswith("run=")]:
        # a run folder the reader has after a GLUE run: kdx-eval composes its choices first
        run = tmp_path / "stand_in_run"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      dataset: glue\n")
        overrides[overrides.index(old)] = f"run={run}"
        overrides = [*run_choices(overrides), *overrides]
    error = misspelt_group(overrides)
    assert error is None, error
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="kdx.conf", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert cfg.get("task_name")


# -- help and misspellings, before any heavy import ----------------------------------------------


def test_help_lists_groups_and_hides_internal_entries():
    text = help_text("kdx-train", "train")
    for group in ("dataset", "teacher", "student", "method", "trainer", "experiment"):
        assert f"  {group} " in text
    assert "[kd]" in text and "[mnist1d]" in text  # defaults marked
    assert "_recipe" not in text and "schema" not in text and "_optuna" not in text.replace("_optuna,", "")


@pytest.mark.e2e
def test_help_and_a_misspelt_group_answer_without_importing_torch(tmp_path):
    code = (
        "import sys, runpy; sys.argv = ['kdx-train', 'metod=kd', 'method=kdd'];"
        "from kdx import cli\n"
        "try:\n    cli._front_door('train')\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('torch imported:', 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert "exit 2" in proc.stdout and "torch imported: False" in proc.stdout
    assert "method=kdd: there is no conf/method/kdd.yaml; did you mean kd" in proc.stderr


def test_every_zoo_model_has_model_student_and_teacher_configs():
    root = conf_root()
    for name in list_models():
        for group in ("model", "student", "teacher"):
            assert name in options(group, root), f"conf/{group}/{name}.yaml missing"
    zoo_configs = [
        o
        for o in options("model", root)
        if "_target_: kdx.models.registry.create_model" in (root / "model" / f"{o}.yaml").read_text()
    ]
    assert sorted(zoo_configs) == list_models()


# -- warnings and errors that point the right way ------------------------------------------------


def test_kda_warm_beyond_the_run_is_a_warning_in_metrics(tmp_path, cache_dir):
    metrics = run_train(["debug=limit", "method=kda", "trainer.max_epochs=2"], tmp_path, cache_dir)
    assert any("method.warm=5 >= trainer.max_epochs=2" in w for w in metrics["warnings"])


def test_an_image_model_on_1d_data_is_one_error_with_the_fix(tmp_path, cache_dir):
    with pytest.raises(
        KDXError, match=r"student=resnet8 cannot read dataset=mnist1d's inputs of shape \(1, 40\)"
    ):
        run_train(["debug=fdr", "student=resnet8"], tmp_path, cache_dir)


# -- resume continues the run it names -----------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_continues_the_named_run(tmp_path, cache_dir):
    small = ["debug=limit", "dataset=synthetic", "dataset.input_shape=[1,40]"]

    def kdx_train(*args: str) -> subprocess.CompletedProcess:
        return run_cli("kdx-train", *args, root=tmp_path, cache=cache_dir)

    first = kdx_train(*small, "method=none", "seed=1", "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = tmp_path.glob("logs/**/train/runs/*")
    resumed = kdx_train(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run}" in resumed.stderr and "trainer.max_epochs=2" in resumed.stderr
    assert list(tmp_path.glob("logs/**/train/runs/*")) == [run]  # same folder, no new one
    record = json.loads((run / "metrics.json").read_text())
    assert (record["method"], record["seed"], record["dataset"], record["epochs"]) == (
        "none",
        1,
        "synthetic",
        2,
    )
    assert record["config"]["ckpt_path"].endswith("last.ckpt")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_model_swapped_in_on_the_command_line_is_recorded_under_its_own_name(tmp_path, cache_dir):
    proc = run_cli(
        "kdx-train",
        "debug=fdr",
        "student.model._target_=kdx.models.small.CNN1D",
        "~student.model.hidden",
        root=tmp_path,
        cache=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("logs/**/train/runs/*/metrics.json")]
    assert record["student"] == "CNN1D" and record["choices"]["student"] == "mlp"
