"""The console scripts' front door: answers ``--help`` and misspelt group choices before the heavy imports.

Importing torch, Lightning, timm and W&B takes 5-15 s on a small machine; a user who typed
``kdx-train --help`` or ``method=kdd`` should not wait for that to be told. This module reads only
the config folders (``kdx.conf``) and the options :mod:`kdx.configs` generates, then hands over to the real entry point, where Hydra composes
and validates everything else (misspelt keys, types, values).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from kdx.configs import conf_root, generated_options

# one line per group: what choosing an option there changes
GROUPS = {
    "dataset": "the data (MNIST-1D, digits, synthetic, CIFAR, ImageNet, GLUE, synthetic text) → kdx.data",
    "teacher": "the teacher: its architecture (model/), its weights (ckpt: path | auto) and its recipe",
    "student": "the student's architecture (model/)",
    "model": "every architecture once; used as model@student.model / model@teacher.model",
    "method": "the distillation method → kdx.methods (none = the student alone)",
    "optim": "optimizer and learning-rate schedule",
    "trainer": "lightning.Trainer settings: device, precision, DDP",
    "logger": "csv (default), tensorboard, wandb (offline unless WANDB_MODE=online), many",
    "callbacks": "checkpoints, LR monitor, Tang et al. diagnostics, throughput",
    "experiment": "a paper's recipe and published numbers, e.g. crd_cifar100/resnet32x4_resnet8x4",
    "hparams_search": "an Optuna search space for one method (implies -m)",
    "debug": "fdr (one batch through everything), limit (a few batches, two epochs)",
    "paths": "where runs, data and the cache go (KDX_ROOT_DIR, KDX_DATA_DIR, KDX_CACHE_DIR)",
}
TOOLS = {"train": "kdx-train", "eval": "kdx-eval", "bench": "kdx-bench"}


def options(group: str, root: Path | None = None) -> list[str]:
    """The choosable options of a group: its files (sub-folders as ``a/b``; ``_``-prefixed files are
    internal) and the options kdx generates (:mod:`kdx.configs`)."""
    folder = (root or conf_root()) / group
    found = set(generated_options(group))
    for path in folder.rglob("*.yaml"):
        parts = path.relative_to(folder).with_suffix("").parts
        if not any(p.startswith("_") for p in parts):
            found.add("/".join(parts))
    return sorted(found)


def _default_choices(config_name: str, root: Path) -> dict[str, str]:
    import yaml

    defaults = yaml.safe_load((root / f"{config_name}.yaml").read_text()).get("defaults", [])
    return {k: str(v) for d in defaults if isinstance(d, dict) for k, v in d.items()}


def help_text(tool: str, config_name: str) -> str:
    root = conf_root()
    defaults = _default_choices(config_name, root)
    lines = [
        f"{tool} [group=option ...] [key=value ...]      one run",
        f"{tool} -m group=a,b key=1,2                   a grid: one run folder per combination",
        "",
        "Config groups (default in [brackets]; a key inside a group: e.g. method.temperature=2):",
    ]
    for group, what in GROUPS.items():
        if group not in defaults and config_name != "train":
            continue
        choices = options(group, root)
        if not choices:
            continue
        default = defaults.get(group)
        first = ([default] if default in choices else []) + [c for c in choices if c != default]
        shown = ", ".join(f"[{c}]" if c == default else c for c in first[:10])
        more = f", … ({len(choices)} in all)" if len(choices) > 10 else ""
        lines += [f"  {group:<15} {what}", f"  {'':<15} {shown}{more}"]
    lines += [
        "",
        "Top-level keys: seed, label, monitor, monitor_mode, ckpt_path (resume), test, torch_threads, tags.",
        f"The whole composed config: {tool} --cfg job [overrides]   Hydra's own help: {tool} --hydra-help",
        "Docs: README.md, docs/ (extending kdx, methods, failures, reproduction).",
    ]
    return "\n".join(lines)


def misspelt_group(argv: list[str]) -> str | None:
    """The error for ``group=option`` where option does not exist in kdx's conf/ (None if all exist)."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath", "--config-path", "-cp")) for a in argv):
        return None  # the user's own config folders may hold the option: let Hydra decide
    root = conf_root()
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        group, value = arg.split("=", 1)
        group = group.split("@", 1)[0]
        if group not in GROUPS or "." in group or value in ("null", ""):
            continue
        known = options(group, root)
        for choice in value.split(","):
            if choice not in known and not (root / group / f"{choice}.yaml").is_file():
                close = difflib.get_close_matches(choice, known, n=3, cutoff=0.5)
                hint = (
                    f"; did you mean {' or '.join(close)}?"
                    if close
                    else f"; choose one of: {', '.join(known)}"
                )
                return f"{group}={choice}: there is no conf/{group}/{choice}.yaml{hint}"
    return None


def _front_door(task: str) -> None:
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(help_text(TOOLS[task], task))
        sys.exit(0)
    error = misspelt_group(argv)
    if error:
        print(f"kdx: error: {error}", file=sys.stderr)
        sys.exit(2)


def train() -> None:
    _front_door("train")
    from kdx.train import main

    main()


def eval() -> None:  # noqa: A001 - the console script's name
    _front_door("eval")
    from kdx.eval import main

    main()


def bench() -> None:
    _front_door("bench")
    from kdx.bench import main

    main()
