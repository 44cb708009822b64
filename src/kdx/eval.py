"""``kdx-eval``: the test figures of one checkpoint, written to ``eval.json``.

    kdx-eval ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt          # that run's own config
    kdx-eval ckpt_path=.cache/teachers/cnn1d-<key>.pt role=teacher split=val   # a plain state_dict

A checkpoint inside a kdx run folder is evaluated with that run's own composed config
(``<run>/.hydra/config.yaml``): its data set, models, teacher and method, so the figures equal the
run's ``metrics.json`` (``student/acc`` for ``last.ckpt``, ``student/acc_best`` for ``best.ckpt``),
fidelity to the teacher included. Overrides on the command line that name run keys
(``dataset.*``, ``student.*``, ``teacher.*``, ``trainer.*``) still apply on top of it. Any other file is
a plain set of weights for ``role=student|teacher``: the model of that group in the composed config
(``teacher=<arch>`` / ``student=<arch>`` pick the architecture; ``model`` is the config group of
architectures, so the key is ``role``). Every file is read with
:func:`kdx.models.weights.read_checkpoint` before anything else: a pickle with a payload is refused in
one line, never run.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m kdx.eval`: the console script's front door, before torch
    from kdx.front_door import front_door, launch

    front_door("eval")

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import kdx.methods  # noqa: F401 - registers method schemas
from kdx.console import configure_console
from kdx.errors import KDXError
from kdx.methods.base import METHODS
from kdx.models.weights import load_weights, read_checkpoint
from kdx.pipeline.build import build, make_module, make_trainer
from kdx.pipeline.compose import CONFIG_DIR
from kdx.pipeline.evaluate import test_metrics
from kdx.pipeline.run import run
from kdx.utils import atomic_write_json

# kdx-eval's split names -> the data protocol's loaders (``train``: the training split un-augmented)
_SPLITS = {"test": "test", "val": "val", "train": "train_eval"}
_RUN_KEYS = ("dataset", "student", "teacher", "method", "optim", "trainer", "seed", "label")


def run_config_of(ckpt_path: Path) -> DictConfig | None:
    """The composed config of the kdx run whose folder holds ``ckpt_path`` (``None`` if none)."""
    for folder in ckpt_path.resolve().parents:
        config = folder / ".hydra" / "config.yaml"
        if config.is_file():
            return OmegaConf.load(config)
    return None


def _overridden_keys() -> set[str]:
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def _with_run_config(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig:
    """``cfg`` with the run's groups, keeping the keys this command line overrode."""
    merged = cfg.copy()
    overridden = _overridden_keys()
    with open_dict(merged):
        for key in _RUN_KEYS:
            if key in run_cfg:
                merged[key] = run_cfg[key]
        merged.paths.cache_dir = run_cfg.paths.get("cache_dir", cfg.paths.cache_dir)
        for dotted in overridden:
            if dotted.split(".")[0] in _RUN_KEYS:
                OmegaConf.update(merged, dotted, OmegaConf.select(cfg, dotted), force_add=True)
    return merged


def evaluate(cfg: DictConfig) -> dict:
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise KDXError(
            f"checkpoint not found: {ckpt}; pass ckpt_path=<run>/checkpoints/best.ckpt or a .pt file"
        )
    run_cfg = run_config_of(ckpt)
    if run_cfg is not None:
        # read safely here, before Lightning does: a payload pickle is named as such, never run
        read_checkpoint(ckpt, "kdx-eval (ckpt_path)")
        cfg = _with_run_config(cfg, run_cfg)
    if cfg.split not in _SPLITS:
        raise KDXError(f"split={cfg.split}: choose one of {', '.join(_SPLITS)}")
    if run_cfg is not None:  # the whole run: student, its teacher, its method
        # a ProKT teacher is trained along with the student: its weights come from the checkpoint
        parts = build(cfg, train_teacher=run, for_training=False)
        datamodule, module = parts.datamodule, parts.module
        ckpt_arg, what = str(ckpt), "student"
    else:  # a plain set of weights for one model
        role = str(cfg.role)
        if role not in ("student", "teacher"):
            raise KDXError(
                f"role={role}: choose role=student or role=teacher (which model the weights are for)"
            )
        model_cfg = cfg[role]
        if model_cfg.get("model") is None:
            raise KDXError(f"{role}={model_cfg.name} has no model to evaluate; pick one, e.g. {role}=cnn1d")
        network = instantiate(model_cfg.model)
        load_weights(network, ckpt, what=role)  # read_checkpoint: refused before any data work
        datamodule = instantiate(cfg.dataset.datamodule)
        module = make_module(cfg, network, METHODS["none"](), optim=OmegaConf.create({}))
        ckpt_arg, what = None, role
    trainer = make_trainer(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, devices=1, strategy="auto"
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    loader = datamodule.dataloader(_SPLITS[cfg.split])
    results = test_metrics(
        trainer.test(module, dataloaders=loader, ckpt_path=ckpt_arg, verbose=False, weights_only=True)
    )
    out = {"split": cfg.split, "model": what, "ckpt": str(ckpt), "run_config": run_cfg is not None, **results}
    out["acc"], out["ece"] = results["student/acc"], results["student/ece"]
    atomic_write_json(Path(cfg.paths.output_dir) / "eval.json", out)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    configure_console()  # Lightning's routine notices stay in the log file
    try:
        out = evaluate(cfg)
    except KDXError as err:
        print(f"kdx: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{out['model']} {out['ckpt']} on {cfg.dataset.name if not out['run_config'] else 'its run data'}/"
        f"{out['split']}: acc {100 * out['acc']:.2f} %  ece {100 * out['ece']:.2f} %"
    )


if __name__ == "__main__":
    launch("eval", main)
