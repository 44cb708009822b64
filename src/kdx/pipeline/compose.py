"""Compose: what Hydra gives a run, completed before anything is checked or built.

* a model swapped in on the command line is recorded under its own name;
* ``ckpt_path`` inside a kdx run folder continues that run with its own config, in its own folder;
* the Hydra runtime facts the later steps ask for (multirun or not, group choices, sweep folder,
  log file), each ``None`` outside a Hydra app (tests, the auto-teacher's run).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from kdx.pipeline.validate import named_run_checkpoint

log = logging.getLogger("kdx")

# conf/ ships inside the package as kdx.conf (the top-level conf/ folder is mapped onto it), so an
# installed wheel finds its configs wherever kdx-train is launched from.
CONFIG_DIR = "pkg://kdx.conf"


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def hydra_choices() -> dict[str, str] | None:
    """The config-group choices of this Hydra app (``None`` outside one)."""
    try:
        choices = HydraConfig.get().runtime.choices
    except ValueError:  # not inside a Hydra app (tests, the teacher run)
        return None
    # conditional includes (a row's tuned method values, a search's hold-out split) are choices too,
    # with a private `_` part in their group or value; they say nothing the user chose
    return {
        k: v
        for k, v in OmegaConf.to_container(choices).items()
        if not k.startswith("hydra/") and v is not None and not _is_private(k) and not _is_private(str(v))
    }


def _is_private(path: str) -> bool:
    return any(part.startswith("_") for part in path.replace("@", "/").split("/"))


def sweep_group() -> str | None:
    """The sweep folder's name in a multirun, which groups its jobs (W&B)."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def hydra_output_dir() -> str | None:
    """The folder Hydra made for this job (``None`` outside a Hydra app)."""
    try:
        return str(HydraConfig.get().runtime.output_dir)
    except (ValueError, KeyError):
        return None


def task_overrides() -> list[str] | None:
    """This job's command-line overrides (``None`` outside a Hydra app)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except (ValueError, KeyError):
        return None


def log_file(cfg: DictConfig) -> str | None:
    try:
        return str(Path(HydraConfig.get().runtime.output_dir) / f"{cfg.task_name}.log")
    except (ValueError, KeyError):
        return None


def name_replaced_models(cfg: DictConfig) -> None:
    """A model swapped in on the command line (``student.model._target_=my.Net``,
    ``model@student.model=resnet8``) is recorded under its own name, never the group default's."""
    task = HydraConfig.get().overrides.task
    for override in task:
        key, _, value = override.lstrip("+~").partition("=")
        for role in ("student", "teacher"):
            named = any(o.lstrip("+").startswith(f"{role}.name=") for o in task)  # the user's own name wins
            if key in (f"{role}.model._target_", f"model@{role}.model") and value and not named:
                with open_dict(cfg):
                    cfg[role].name = value.rsplit(".", 1)[-1]


def _run_folder_of(path: Path) -> Path | None:
    return next((p for p in path.resolve().parents if (p / ".hydra" / "overrides.yaml").is_file()), None)


def resume_config(cfg: DictConfig) -> DictConfig:
    """``ckpt_path`` inside a kdx run folder: continue that run — its own config (plus this command
    line's overrides), in its own folder — and say so."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt or is_multirun():
        return cfg
    path = named_run_checkpoint(Path(str(ckpt)).expanduser())  # a run folder: its last.ckpt
    run_dir = _run_folder_of(path) if path.is_file() else None
    if run_dir is None:
        return cfg
    own = [o for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml") if not o.startswith("ckpt_path=")]
    given = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    resumed = compose(config_name="train", overrides=[*own, *given, f"ckpt_path={path.resolve()}"])
    with open_dict(resumed):
        resumed.paths.output_dir = str(run_dir)
    handler = logging.FileHandler(run_dir / f"{resumed.task_name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    message = (
        f"resuming run {run_dir} from {path.name} with its own config"
        f" ({' '.join(own) or 'the defaults'})"
        + (f" and this command line's {' '.join(given)}" if given else "")
    )
    log.info(message)
    print(f"kdx: {message}", file=sys.stderr, flush=True)
    return resumed
