"""One front door: ``kdx-train`` and ``python -m kdx.train`` answer --help and catch misspelt keys and
options before torch is imported, with the key that exists; an ill-typed value is one line too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import CONF_DIR
from kdx.cli import composition_error, help_text
from kdx.front_door import swept_keys

BIN = Path(sys.executable).parent


def front(
    *args: str, module: bool = False, cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, "-m", "kdx.train"] if module else [str(BIN / "kdx-train")]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    start = time.perf_counter()
    proc = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    return proc, time.perf_counter() - start


def test_python_m_kdx_train_help_is_kdx_train_help_and_fast(tmp_path):
    console, _ = front("--help", cwd=tmp_path)
    module, seconds = front("--help", module=True, cwd=tmp_path)
    assert module.returncode == 0 and module.stdout == console.stdout
    assert "Hydra" not in module.stdout.splitlines()[0]  # kdx's own help, not Hydra's generic one
    assert seconds < 5  # under 1 s on an idle machine; no torch import either way


@pytest.mark.parametrize("module", [False, True])
def test_a_misspelt_key_is_caught_before_torch_with_the_key_that_exists(module, tmp_path):
    proc, seconds = front("method.alpah=0.5", module=module, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == "kdx: error: method.alpah=0.5: there is no key method.alpah; did you mean method.alpha?"
    assert "+" not in line  # never Hydra's `+method.alpah` hint, which kdx rejects
    assert seconds < 5 and not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_an_unknown_option_is_the_same_error_through_python_m(tmp_path):
    proc, _ = front("method=kdd", module=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("kdx: error: method=kdd: there is no conf/method/kdd.yaml; did you mean kd")


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("method.T=2", "method.temperature"),  # an abbreviation
        ("dataset.batch_size=3", "dataset.datamodule.batch_size"),  # the same name deeper down
        ("teacher.train.max_epochs=3", "teacher.train.epochs"),  # a close name
        ("trainer.max_epoch=3", "trainer.max_epochs"),  # a spelling
        ("method=dkd method.alpah=1", "method.alpha"),  # the chosen method's keys
    ],
)
def test_a_missing_key_points_at_the_key_that_exists(override, meant):
    error = composition_error("train", override.split(), typed=False)
    assert error is not None and error.endswith(f"did you mean {meant}?"), error
    assert "+" not in error


def test_a_sweep_is_checked_for_every_swept_group():
    # temperature exists for kd but not for none: the second job would fail, so none starts
    error = composition_error("train", ["-m", "method=kd,none", "method.temperature=2"], typed=False)
    assert error is not None and error.startswith("method.temperature=2: there is no key method.temperature")
    assert (
        composition_error("train", ["-m", "method=kd,dkd", "seed=0,1", "method.temperature=2"], typed=False)
        is None
    )


def test_a_valid_command_line_and_hydra_flags_pass_the_front_door():
    for argv in (
        [],
        ["teacher=mlp", "teacher.name=mlp_big"],
        ["+method.extra=1"],  # kdx's own validation names what no code reads
        ["-m", "method._target_=my.Fault,kdx.methods.kd.KD"],  # a method of one's own
        ["--cfg", "job"],
        ["hparams_search=kd_optuna"],
        ["--info"],
    ):
        assert composition_error("train", argv, typed=False) is None, argv


def test_an_ill_typed_value_is_one_kdx_error_line():
    import kdx.methods  # noqa: F401 - the typed schemas, as the entry point has them

    error = composition_error("train", ["method.temperature=hot"], typed=True)
    assert error is not None and error.startswith("method.temperature=hot:") and "\n" not in error


def test_help_lists_every_option_and_the_users_own(tmp_path):
    text = help_text("kdx-train", "train")
    assert "…" not in text and "in all)" not in text  # no option list cut short
    for option in ("wrn_40_2", "vgg8", "vid", "prokt_glue/sst2", "crd_cifar100/wrn_40_2_wrn_40_1"):
        assert option in text
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "my_kd.yaml").write_text("defaults:\n  - kd\n")
    argv = ["--config-dir", str(tmp_path)]
    proc = subprocess.run(
        [str(BIN / "kdx-train"), "--help", *argv], capture_output=True, text=True, timeout=60
    )
    assert "my_kd" in proc.stdout
    assert composition_error("train", [*argv, "method=my_kd", "method.alpah=1"], typed=False).endswith(
        "did you mean method.alpha?"
    )


def test_a_teacher_named_on_the_command_line_keeps_its_name(tmp_path, monkeypatch):
    from kdx.pipeline.compose import name_replaced_models

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # teardown leaves no Hydra app behind

    overrides = ["model@teacher.model=mlp", "teacher.name=mlp_big"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    name_replaced_models(cfg)
    assert cfg.teacher.name == "mlp_big"


def test_a_multiruns_swept_keys_name_its_jobs():
    assert swept_keys(["-m", "method=kd,dkd", "seed=0,1", "debug=fdr", "+x=range(2)"]) == [
        "method",
        "seed",
        "x",
    ]
    assert swept_keys(["method=kd", "seed=0"]) == []  # not a multirun
