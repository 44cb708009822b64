"""``kdx-eval``: the test figures of one checkpoint, written to ``eval.json``.

    kdx-eval run=logs/train/runs/<run>                                      # its best checkpoint
    kdx-eval run=logs/train/runs/<run> dataset.root=<another copy of the data>  # on other files
    kdx-eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt          # that run's own config
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

``run=<run folder>`` evaluates the checkpoint its ``metrics.json`` names as the best
(``student/best_ckpt``), or its ``last.ckpt``. The run's data set, student and teacher choices are
put on the command line before the user's own (:func:`kdx.front_door.run_choices`), so
``dataset.root=<dir>`` needs no ``+`` and evaluates on that folder's test split (GLUE: its dev).

kdx-eval trains nothing. The teacher (fidelity figures) is the run's own, the file its
``metrics.json`` names (``teacher/ckpt``), checked by its sha256; when that file is gone or
changed, the teacher is skipped: the student is evaluated alone (method ``none``), said on stderr
and in ``eval.json`` (``teacher_skipped``). A tokenizer the run trained (``model.tokenizer=train``)
is the folder its ``metrics.json`` names, never one trained again on the other files.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m kdx.eval`: the console script's front door, before torch
    from kdx.front_door import front_door, launch

    front_door("eval")

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import kdx.methods  # noqa: F401 - registers method schemas
from kdx.console import configure_console
from kdx.data.text import TRAIN_TOKENIZER
from kdx.errors import KDXError
from kdx.front_door import run_folder_choices
from kdx.methods.base import METHODS
from kdx.models.weights import load_weights, read_checkpoint
from kdx.pipeline.build import build, make_module, make_trainer
from kdx.pipeline.compose import CONFIG_DIR
from kdx.pipeline.evaluate import test_metrics
from kdx.pipeline.validate import named_run_checkpoint
from kdx.record import RecordError, RunRecord, read_record
from kdx.utils import atomic_write_json, sha256_file

# kdx-eval's split names -> the data protocol's loaders (``train``: the training split un-augmented)
_SPLITS = {"test": "test", "val": "val", "train": "train_eval"}
_RUN_KEYS = ("dataset", "student", "teacher", "method", "optim", "trainer", "seed", "label")


def _run_folder(ckpt_path: Path) -> Path | None:
    return next((f for f in ckpt_path.resolve().parents if (f / ".hydra" / "config.yaml").is_file()), None)


def run_config_of(ckpt_path: Path) -> DictConfig | None:
    """The composed config of the kdx run whose folder holds ``ckpt_path`` (``None`` if none)."""
    folder = _run_folder(ckpt_path)
    return None if folder is None else OmegaConf.load(folder / ".hydra" / "config.yaml")


def _overridden_keys(choices: dict[str, str]) -> set[str]:
    """The keys this command line overrode; a group set to the run's own choice (as the front
    door puts them, :func:`kdx.front_door.run_choices`) is not a change."""
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return set()
    keys = set()
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if choices.get(key) != value:
            keys.add(key)
    return keys


def _with_run_config(
    cfg: DictConfig, run_cfg: DictConfig, choices: dict[str, str] | None = None
) -> DictConfig:
    """``cfg`` with the run's groups, keeping the keys this command line overrode."""
    merged = cfg.copy()
    overridden = _overridden_keys(choices or {})
    with open_dict(merged):
        for key in _RUN_KEYS:
            if key in run_cfg:
                merged[key] = run_cfg[key]
        merged.paths.cache_dir = run_cfg.paths.get("cache_dir", cfg.paths.cache_dir)
        for dotted in overridden:
            if dotted.split(".")[0] in _RUN_KEYS:
                OmegaConf.update(merged, dotted, OmegaConf.select(cfg, dotted), force_add=True)
    return merged


def _run_checkpoint(folder: Path) -> Path:
    """``run=<folder>``: the best checkpoint its record names, else its ``last.ckpt``."""
    if not (folder / ".hydra" / "config.yaml").is_file():
        raise KDXError(f"run={folder} is not a kdx run folder (no .hydra/config.yaml); pass a run's folder")
    record = _record_of(folder)
    best = record.student_best_ckpt if record is not None else None
    if best and Path(best).is_file():
        return Path(best)
    last = named_run_checkpoint(folder)
    if not last.is_file():
        raise KDXError(f"run={folder} has no checkpoint (checkpoints/last.ckpt); did it train?")
    return last


def _record_of(folder: Path) -> RunRecord | None:
    """The run's metrics.json (``None`` when it has none or it cannot be read)."""
    try:
        return read_record(folder)
    except (OSError, RecordError):
        return None


def _pin_run_facts(cfg: DictConfig, folder: Path) -> str | None:
    """Pin what the run resolved when it was built (its trained tokenizer and vocabulary, its
    teacher's file), so that evaluating on other files trains nothing; returns why the teacher is
    skipped, or ``None``."""
    record = _record_of(folder)
    recorded = (record.config if record is not None else None) or {}
    with open_dict(cfg):
        for role in ("student", "teacher"):
            model = cfg.get(role, {}).get("model") if cfg.get(role) is not None else None
            if model is None or "tokenizer" not in model:
                continue
            done = ((recorded.get(role) or {}).get("model") or {}) if isinstance(recorded, dict) else {}
            if model.get("tokenizer") in (None, TRAIN_TOKENIZER) and done.get("tokenizer") not in (
                None,
                TRAIN_TOKENIZER,
            ):
                model.tokenizer = done["tokenizer"]
                if model.get("vocab_size") is None and done.get("vocab_size") is not None:
                    model.vocab_size = done["vocab_size"]
    teacher = cfg.get("teacher")
    if teacher is None or teacher.get("model") is None or str(teacher.get("ckpt")) != "auto":
        return None
    target = cfg.method.get("_target_") if cfg.get("method") is not None else None
    use = getattr(get_class(str(target)), "teacher_use", None) if target else None
    if use is not None and use.trains_teacher:
        return None  # trained along with the student: its weights are in the checkpoint
    path, digest = (record.teacher_ckpt, record.teacher_sha256) if record is not None else (None, None)
    if path and digest and Path(path).is_file() and sha256_file(path) == digest:
        with open_dict(cfg):
            cfg.teacher.ckpt = path
        return None
    return (
        f"the run's teacher {path or '(not recorded)'} is gone or changed"
        if path
        else "the run's metrics.json names no teacher file"
    )


def _without_teacher(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.teacher.model = None
        cfg.method = {"_target_": f"{METHODS['none'].__module__}.{METHODS['none'].__qualname__}"}


def evaluate(cfg: DictConfig) -> dict:
    run_dir = Path(str(cfg.run)).expanduser() if cfg.get("run") else None
    if run_dir is not None:
        ckpt = _run_checkpoint(run_dir)
    elif cfg.get("ckpt_path") is None:
        raise KDXError("kdx-eval needs run=<run folder> or ckpt_path=<checkpoint file>")
    else:
        ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise KDXError(
            f"checkpoint not found: {ckpt}; pass ckpt_path=<run>/checkpoints/best.ckpt or a .pt file"
        )
    run_cfg = run_config_of(ckpt)
    skipped = None
    if run_cfg is not None:
        # read safely here, before Lightning does: a payload pickle is named as such, never run
        read_checkpoint(ckpt, "kdx-eval (ckpt_path)")
        folder = _run_folder(ckpt)
        cfg = _with_run_config(cfg, run_cfg, run_folder_choices(folder))
        skipped = _pin_run_facts(cfg, folder)
    if cfg.split not in _SPLITS:
        raise KDXError(f"split={cfg.split}: choose one of {', '.join(_SPLITS)}")
    if run_cfg is not None and skipped is None:  # the whole run: student, its teacher, its method
        # a ProKT teacher is trained along with the student: its weights come from the checkpoint;
        # no teacher is ever trained here (train_teacher=None)
        parts = build(cfg, train_teacher=None, for_training=False)
        datamodule, module = parts.datamodule, parts.module
        ckpt_arg, what = str(ckpt), "student"
    elif run_cfg is not None:  # the run's student alone: its teacher is not at hand
        print(f"kdx: the teacher part is skipped: {skipped}; evaluating the student alone", file=sys.stderr)
        _without_teacher(cfg)
        parts = build(cfg, train_teacher=None, for_training=False)
        load_weights(parts.student, ckpt, what="student")
        datamodule = parts.datamodule
        module = make_module(cfg, parts.student, METHODS["none"](), optim=OmegaConf.create({}))
        ckpt_arg, what = None, "student"
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
    if skipped is not None:
        out["teacher_skipped"] = skipped
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
