"""Shared test helpers: compose kdx's Hydra configs with temporary folders, and run them in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import kdx.methods  # noqa: F401 - registers method schemas

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
TESTS = Path(__file__).resolve().parent

# Test modules share fixtures of data (test_table's records, test_preact_features' model pairs) across
# folders: every test folder is importable whatever order pytest collects them in.
for folder in sorted({p.parent for p in TESTS.rglob("test_*.py")}):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e drives kdx's console scripts in a subprocess: ``-m "not e2e"``
    leaves those out."""
    for item in items:
        if (TESTS / "e2e") in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


torch.set_num_threads(1)  # small models: one thread is fastest, and robust to a busy machine


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole session: MNIST-1D arrays and auto-trained teachers are built once."""
    return tmp_path_factory.mktemp("kdx-cache")


def compose_train(
    overrides: list[str], output_dir: Path, cache_dir: Path, config_name: str = "train"
) -> DictConfig:
    """The composed config of `kdx-train <overrides>`, writing into output_dir, caching into cache_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.root_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir / "data")
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.paths.cache_dir = str(cache_dir)
        cfg.paths.output_dir = str(output_dir)
    GlobalHydra.instance().clear()
    return cfg


def run_train(overrides: list[str], output_dir: Path, cache_dir: Path) -> dict:
    """Compose and run one training job in this process; returns the metrics it wrote."""
    from kdx.train import run

    return run(compose_train(overrides, output_dir, cache_dir))


# fast end-to-end settings: Lightning's fast_dev_run and a one-epoch, two-batch teacher
# a smaller synthetic CIFAR split: resnet32x4 costs ~1 GFLOP per image on one CPU thread
SMALL_CIFAR = [
    "dataset=synthetic_cifar",
    "dataset.datamodule.num_train=64",
    "dataset.datamodule.num_val=32",
    "dataset.datamodule.num_test=32",
    "dataset.datamodule.batch_size=16",
]
FAST = ["debug=fdr", "logger=csv", "trainer.accelerator=cpu"]


SUPPORT = Path(__file__).parent / "support"  # fault-injecting methods for subprocess runs


def run_cli(
    tool: str, *args: str, root: Path, cache: Path, timeout: int = 300, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """A console script as a user runs it: from ``root``, caching into ``cache``, W&B offline and quiet,
    ``tests/support`` importable (for ``method._target_=kdx_faults.<Fault>``)."""
    env = {
        **os.environ,
        "KDX_ROOT_DIR": str(root),
        "KDX_CACHE_DIR": str(cache),
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]),
        **(extra_env or {}),
    }
    env.pop("WANDB_MODE", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / tool), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=timeout,
    )


class HostReads:
    """Counts the calls that copy a tensor's value to the host (a device sync on a GPU) made directly
    by code under the ``watched`` paths while ``active``."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, watched: tuple[str, ...]):
        self.active, self.calls, self.watched = False, [], watched
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if self.active and caller.startswith(self.watched):
                self.calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(tensor, *args, **kwargs)

        return counted
