"""``kdx-train``: one run of the pipeline (:mod:`kdx.pipeline`) per job.

    kdx-train                                   # MNIST-1D, CNN teacher (auto-trained, cached), MLP student, KD
    kdx-train method=none seed=1 trainer.max_epochs=10
    kdx-train -m method=none,kd seed=0,1,2      # six run folders, each with metrics.json

Hydra composes the config; :func:`main` completes it (models named by their override, a resumed
run's own config) and hands it to :func:`kdx.pipeline.run.run_job`, which runs compose's output
through validate → build → fit → evaluate → record and turns a failure into a failed
``metrics.json`` and an exit code (2 for a user error, 1 for a bug).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m kdx.train`: the console script's front door, before torch
    from kdx.front_door import front_door, launch

    front_door("train")

import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

import kdx.methods  # noqa: F401 - registers every method's schema before composition
from kdx.console import configure_console, hydra_job_name
from kdx.pipeline.compose import CONFIG_DIR, name_replaced_models, resume_config
from kdx.pipeline.run import run, run_job

__all__ = ["CONFIG_DIR", "main", "run"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    configure_console(hydra_job_name())  # Hydra has just set up this job's logging
    name_replaced_models(cfg)
    resumed = resume_config(cfg)
    try:
        return run_job(resumed)
    finally:
        if resumed is not cfg:  # the run went on in its own folder: drop the empty one Hydra made
            made = Path(cfg.paths.output_dir)
            if {p.name for p in made.iterdir()} <= {".hydra", f"{cfg.task_name}.log"}:
                shutil.rmtree(made, ignore_errors=True)


if __name__ == "__main__":
    launch("train", main)
