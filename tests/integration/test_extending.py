"""docs/extending.md: a user's own method, model and data set, outside kdx, found through
PYTHONPATH and a config folder of their own.

The example code in docs/examples/my_kd is checked in-process (loss by hand, the batch contract,
the adapter); then every ``kdx-train`` command of the page runs as written, through bash and the
real entry point, with ``debug=fdr`` appended.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import ROOT

EXAMPLES = ROOT / "docs" / "examples"
DOC = ROOT / "docs" / "extending.md"
USER_GROUPS = {"method": "logit_mse", "student": "tiny_conv1d", "dataset": "waves"}
# where each group's class is named in a run's config
TARGET_PATH = {"method": ("method",), "student": ("student", "model"), "dataset": ("dataset", "datamodule")}


@pytest.fixture
def my_kd(monkeypatch):
    """The user's package, importable the way the page says (PYTHONPATH=docs/examples)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import my_kd.data
    import my_kd.methods
    import my_kd.models

    return my_kd


# -- the example code --------------------------------------------------------------------------


def test_logit_mse_loss_by_hand(my_kd):
    from kdx.models.base import ModelOutput

    # z_s = (0, 0), z_t = (1, -1), y = 0:
    #   CE  = -log softmax(0, 0)[0] = log 2
    #   MSE = ((0 - 1)² + (0 + 1)²) / 2 = 1
    #   loss = (1 - α)·log 2 + α·1 = 0.5·0.693147 + 0.5 = 0.846574 at α = 0.5
    student, teacher = ModelOutput(torch.tensor([[0.0, 0.0]])), ModelOutput(torch.tensor([[1.0, -1.0]]))
    terms = my_kd.methods.LogitMSE(alpha=0.5).loss(student, teacher, torch.tensor([0]), torch.tensor([0]))
    assert terms["ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["mse"].item() == pytest.approx(1.0, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * math.log(2) + 0.5, abs=1e-6)
    plain = my_kd.methods.LogitMSE(alpha=0.0).loss(student, teacher, torch.tensor([0]), torch.tensor([0]))
    assert plain["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # α = 0: cross-entropy alone


def test_logit_mse_rejects_alpha_outside_unit_interval(my_kd):
    with pytest.raises(ValueError, match=r"method\.alpha=1\.5"):
        my_kd.methods.LogitMSE(alpha=1.5)


def test_waves_batches_follow_kdx_contract(my_kd):
    torch.manual_seed(0)  # a run seeds torch first; the shuffling sampler draws its seed from it
    data = my_kd.data.WavesDataModule(num_train=40, num_val=8, num_test=8, batch_size=16)
    data.setup("fit")
    x, y, index = next(iter(data.train_dataloader()))
    assert x.shape == (16, 1, 40) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < data.num_classes
    assert len(set(index.tolist())) == 16 and all(0 <= i < 40 for i in index.tolist())
    # the index is the example's position: the unshuffled loader gives 0, 1, 2, ... and the example
    # itself back
    _, y_ordered, index_ordered = next(iter(data.train_eval_dataloader()))
    assert index_ordered.tolist() == list(range(16))
    assert int(data.train_set[int(index[0])][1]) == int(y[0])
    # the data is the seed's, not the run's
    torch.manual_seed(123)
    again = my_kd.data.WavesDataModule(num_train=40, num_val=8, num_test=8, batch_size=16)
    again.setup("fit")
    assert torch.equal(again.train_set[5][0], data.train_set[5][0])


def test_waves_class_is_the_frequency(my_kd):
    # without noise, x(t) = sin(2π(y+1)t/40 + φ) over a whole number of periods: its spectrum has one
    # peak, at bin y + 1
    data = my_kd.data.WavesDataModule(num_train=50, num_val=5, num_test=5, noise=0.0)
    data.setup("fit")
    xs = torch.stack([data.train_set[i][0] for i in range(50)]).squeeze(1)
    ys = torch.stack([data.train_set[i][1] for i in range(50)])
    peak = torch.fft.rfft(xs).abs().argmax(dim=1)
    assert torch.equal(peak, ys + 1)


def test_tiny_conv1d_gives_logits_and_embedding_through_kdx_adapter(my_kd):
    from kdx.models.adapter import as_feature_model

    model = my_kd.models.TinyConv1d(num_classes=5, input_shape=(1, 40), channels=16).eval()
    adapter = as_feature_model(model)
    x = torch.randn(3, 1, 40)
    out = adapter(x, {"logits", "embedding"})
    assert out.logits.shape == (3, 5) and adapter.num_classes == 5
    # the embedding is the input of the last nn.Linear (`head`): the pooled conv features
    torch.testing.assert_close(out.embedding, model.features(x))
    torch.testing.assert_close(out.logits, model(x))


# -- the page's commands, as written -----------------------------------------------------------


def _page_commands() -> tuple[list[str], list[str]]:
    """(setup lines, kdx-train commands) of the page's ```bash blocks."""
    setup, commands = [], []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("export "):
                setup.append(line)
            elif line.startswith("kdx-train"):
                commands.append(line)
    return setup, commands


SETUP, COMMANDS = _page_commands()


def test_page_shows_each_example():
    shown = " ".join(COMMANDS)
    for group, name in USER_GROUPS.items():
        assert f"{group}={name}" in shown, f"docs/extending.md runs no command with {group}={name}"
    assert any("--config-dir" in c for c in COMMANDS) and any("hydra.searchpath" in c for c in COMMANDS)


@pytest.fixture(scope="module")
def user_cache(tmp_path_factory) -> Path:
    """One cache for the page's runs: the MNIST-1D data and teachers are made once."""
    return tmp_path_factory.mktemp("extending-cache")


def _check_run(metrics: dict, config: dict, command: str) -> None:
    assert metrics["status"] == "ok", metrics.get("error")
    for group, name in USER_GROUPS.items():
        if f"{group}={name}" in command:
            node = config
            for key in TARGET_PATH[group]:
                node = node[key]
            assert node["_target_"].startswith("my_kd."), f"{group} was built from {node['_target_']}"
            if group != "method":  # recorded under the user's name (the method's: below, from the CLI)
                assert metrics[group] == name


# The real entry point costs several seconds of imports per process: the page's --config-dir
# commands are composed and run in this process (the same overrides, the folder added to the search
# path as --config-dir adds it), and the remaining command goes through bash and `kdx-train` as written
# (the `export`, PATH, quoting, the entry point).
IN_PROCESS = [c for c in COMMANDS if "--config-dir" in c]
THROUGH_CLI = [c for c in COMMANDS if "--config-dir" not in c]


@pytest.mark.parametrize("command", IN_PROCESS)
def test_page_command_in_process(command, tmp_path, user_cache, my_kd):
    from conftest import compose_train
    from kdx.train import run

    args = shlex.split(command)[1:]
    position = args.index("--config-dir")
    config_dir = (ROOT / args[position + 1]).resolve()
    overrides = [
        *args[:position],
        *args[position + 2 :],
        f"hydra.searchpath=[file://{config_dir}]",
        "debug=fdr",
    ]
    cfg = compose_train(overrides, tmp_path, user_cache)
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    _check_run(metrics, OmegaConf.to_container(cfg), command)  # _target_s are plain strings


@pytest.mark.e2e
@pytest.mark.parametrize("command", THROUGH_CLI)
def test_page_command_through_cli(command, tmp_path, user_cache):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "KDX_ROOT_DIR": str(tmp_path),  # run folders go here, not into the clone
        "KDX_CACHE_DIR": str(user_cache),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)  # the page's own `export` sets it
    script = "\n".join(["set -e", *SETUP, f"{command} debug=fdr"])
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    (metrics_path,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())
    config = yaml.safe_load((metrics_path.parent / ".hydra" / "config.yaml").read_text())
    _check_run(metrics, config, command)
    for group, name in USER_GROUPS.items():
        if f"{group}={name}" in command:
            assert metrics[group] == name  # Hydra's choice: the method too


def test_page_commands_split_between_cli_and_in_process():
    assert IN_PROCESS and THROUGH_CLI, "the page needs --config-dir and hydra.searchpath commands"
