"""``kdx-eval``: accuracy and calibration of one checkpoint on a data split, written to eval.json.

A kdx run's Lightning checkpoint holds both models; ``model=student`` (default) or
``model=teacher`` says which one to read, and that group's config gives the architecture.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdx.methods  # noqa: F401 - registers method schemas
from kdx.errors import KDXError
from kdx.methods.base import METHODS
from kdx.module import DistillationModule
from kdx.teacher import load_weights
from kdx.train import CONFIG_DIR, _test_metrics
from kdx.utils import atomic_write_json


def evaluate(cfg: DictConfig) -> dict:
    if cfg.model not in ("student", "teacher"):
        raise KDXError(f"model={cfg.model}: choose model=student or model=teacher")
    model_cfg = cfg[cfg.model]
    if model_cfg.get("model") is None:
        raise KDXError(f"{cfg.model}={model_cfg.name} has no model to evaluate")
    network = instantiate(model_cfg.model)
    load_weights(network, cfg.ckpt_path, what=cfg.model)
    datamodule = instantiate(cfg.dataset.datamodule)
    module = DistillationModule(
        student=network,
        method=METHODS["none"](),
        num_classes=cfg.dataset.num_classes,
        optimizer=lambda params: None,
    )
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    loaders = {"test": "test_dataloader", "val": "val_dataloader", "train": "train_eval_dataloader"}
    if cfg.split not in loaders:
        raise KDXError(f"split={cfg.split}: choose one of {', '.join(loaders)}")
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    loader = getattr(datamodule, loaders[cfg.split])()
    results = _test_metrics(trainer.test(module, dataloaders=loader, verbose=False))
    out = {
        "split": cfg.split,
        "model": cfg.model,
        "ckpt": str(cfg.ckpt_path),
        "acc": results["student/acc"],
        "ece": results["student/ece"],
    }
    atomic_write_json(Path(cfg.paths.output_dir) / "eval.json", out)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        out = evaluate(cfg)
    except KDXError as err:
        print(f"kdx: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{out['model']} {out['ckpt']} on {cfg.dataset.name}/{out['split']}: "
        f"acc {out['acc']:.4f}  ece {out['ece']:.4f}"
    )


if __name__ == "__main__":
    main()
