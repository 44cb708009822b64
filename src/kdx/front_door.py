"""The front door of the console scripts (:mod:`kdx.cli`) and of ``python -m kdx.<entry>``: answers
``--help``, misspelt group choices and misspelt keys before the heavy imports.

Importing torch, Lightning, timm and W&B takes 5-15 s on a small machine; a user who typed
``kdx-train --help``, ``method=kdd`` or ``method.alpah=0.5`` should not wait for that to be told.
This module reads only the config folders (``kdx.conf`` and the user's own on the search path) and
the options :mod:`kdx.configs` generates, composes the command line's config with Hydra's compose
API (method schemas read from the sources: untyped stand-ins), then hands over to the real entry
point. There the command line is composed once more with the typed schemas, so that an ill-typed
value is the same one ``kdx: error:`` line (exit 2), before Hydra runs the job. ``kdx-train`` and
``python -m kdx.train`` both come through here (:func:`front_door`, :func:`launch`).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdx.configs import conf_root, generated_options, register_signature_schemas
from kdx.console import SWEEP_KEYS_ENV, pipe_safe_stdio, quiet_broken_pipe

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


def options(group: str, root: Path | None = None, extra: list[Path] | tuple[Path, ...] = ()) -> list[str]:
    """The choosable options of a group: its files (sub-folders as ``a/b``; ``_``-prefixed files are
    internal) in kdx's conf/ and in the ``extra`` config folders, and the options kdx generates
    (:mod:`kdx.configs`)."""
    found = set(generated_options(group))
    for base in [root or conf_root(), *extra]:
        folder = base / group
        for path in folder.rglob("*.yaml"):
            parts = path.relative_to(folder).with_suffix("").parts
            if not any(p.startswith("_") for p in parts):
                found.add("/".join(parts))
    return sorted(found)


def user_config_dirs(argv: list[str]) -> list[Path]:
    """The user's own config folders named on the command line: ``--config-dir``/``-cd`` and the
    ``file://`` entries of ``hydra.searchpath=[...]``."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    dirs.append(Path(entry[len("file://") :]))
    return [d.expanduser() for d in dirs if d.expanduser().is_dir()]


def _default_choices(config_name: str, root: Path) -> dict[str, str]:
    import yaml

    defaults = yaml.safe_load((root / f"{config_name}.yaml").read_text()).get("defaults", [])
    return {k: str(v) for d in defaults if isinstance(d, dict) for k, v in d.items()}


def help_text(tool: str, config_name: str, extra: list[Path] | tuple[Path, ...] = ()) -> str:
    """The help of a console script: every option of every group (kdx's, the generated ones and
    those of the ``extra`` config folders)."""
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
        choices = options(group, root, extra)
        if not choices:
            continue
        default = defaults.get(group)
        first = ([default] if default in choices else []) + [c for c in choices if c != default]
        shown = [f"[{c}]" if c == default else c for c in first]
        if len(shown) > 5:
            shown.append(f"({len(shown)} options)")
        lines += [f"  {group:<15} {what}", *_wrapped(shown, indent=18)]
    lines += [
        "",
        "Config folders of your own (more options, your own methods' configs):",
        f"  {tool} --config-dir my_conf ...   or   hydra.searchpath=[file://my_conf]",
        "Top-level keys: seed, label, monitor, monitor_mode, ckpt_path (resume), test, torch_threads, "
        "cpu_allocator, tags.",
        f"The whole composed config: {tool} --cfg job [overrides]   Hydra's own help: {tool} --hydra-help",
        "Docs: README.md, docs/ (extending kdx, methods, failures, reproduction).",
    ]
    return "\n".join(lines)


def _wrapped(items: list[str], indent: int, width: int = 100) -> list[str]:
    lines, line = [], ""
    for item in items:
        piece = f"{item}, "
        if line and indent + len(line) + len(piece) > width:
            lines.append(" " * indent + line.rstrip())
            line = ""
        line += piece
    return [*lines, " " * indent + line.rstrip().rstrip(",")]


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


# -- composing the command line -----------------------------------------------------------------

# Hydra's own flags whose answer is not a run: nothing to check
_NOT_A_RUN = ("--hydra-help", "--info", "--shell-completion", "--version", "--experimental-rerun", "-i")
# at most this many compositions per command line (one per option of each swept group)
_MAX_COMPOSITIONS = 16


def _hydra_args(argv: list[str]) -> Any | None:
    from hydra._internal.utils import get_args_parser  # Hydra's own parser: the same reading of argv

    try:
        return get_args_parser().parse_intermixed_args(argv)
    except (SystemExit, TypeError):  # Hydra will say what is wrong with it
        return None


def _compositions(overrides: list[str], multirun: bool, typed: bool) -> Iterator[list[str]]:
    """The override lists to compose: the command line itself, or for a sweep one list per option of
    each swept group (``typed``: of each swept value too), the others at their first option;
    searches (interval, tag) are left out."""
    if not multirun:
        yield overrides
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            values.append([override.input_line])
            continue
        try:
            options = [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
        except Exception:  # noqa: BLE001 - an interval or a search: the sweeper draws its values
            options = []
        values.append(options)
    yield [v[0] for v in values if v]
    for i, swept in enumerate(values):
        key = swept[0].split("=", 1)[0] if swept else ""
        if not typed and key.split("@", 1)[0] not in GROUPS and "/" not in key:
            continue  # another value of the same key: the same keys exist
        for option in swept[1:]:
            yield [option if j == i else v[0] for j, v in enumerate(values) if v]


def _compose(config_name: str, overrides: list[str], extra: list[Path]) -> Any:
    """Compose inside :func:`composition_error`'s Hydra context."""
    from hydra import compose

    if extra:
        paths = ",".join(f"file://{p.resolve()}" for p in extra)
        overrides = [o for o in overrides if not o.lstrip("+").startswith("hydra.searchpath=")]
        overrides = [*overrides, f"hydra.searchpath=[{paths}]"]
    return compose(config_name=config_name, overrides=overrides)


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            out.append(path)
            out += _flat_keys(value, f"{path}.")
    return out


def _nearest_keys(cfg: Any, key: str) -> tuple[str, list[str], list[str]]:
    """For a key that does not exist: the deepest node that does, the keys that are probably meant
    (the same name deeper down, a close spelling, an abbreviation) and that node's own keys."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=False)
    parts = key.split(".")
    node, depth = tree, 0
    while depth < len(parts) - 1 and isinstance(node, dict) and isinstance(node.get(parts[depth]), dict):
        node, depth = node[parts[depth]], depth + 1
    base = ".".join(parts[:depth])
    rest, name = ".".join(parts[depth:]), parts[-1]
    flat = _flat_keys(node)
    leaf = {p: p.rsplit(".", 1)[-1] for p in flat}
    close_leaves = set(difflib.get_close_matches(name, sorted(set(leaf.values())), n=3, cutoff=0.7))
    ranked = [
        [p for p in flat if leaf[p] == name],  # dataset.batch_size -> dataset.datamodule.batch_size
        difflib.get_close_matches(rest, flat, n=3, cutoff=0.75),  # method.alpah -> method.alpha
        [p for p in flat if "." not in p and p.lower().startswith(name.lower())],  # method.T -> temperature
        [
            p for p in flat if leaf[p] in close_leaves and p.count(".") == rest.count(".")
        ],  # max_epochs -> epochs
    ]
    meant: list[str] = []
    for group in ranked:
        meant += [p for p in group if p not in meant]
        if meant:
            break
    full = [f"{base}.{p}" if base else p for p in meant[:3]]
    own = sorted(k for k in node if not str(k).startswith("_")) if isinstance(node, dict) else []
    return base, full, own


def _key_error(config_name: str, overrides: list[str], bad: str, extra: list[Path]) -> str:
    key = bad.lstrip("~")
    line = next((o for o in overrides if o.split("=", 1)[0].lstrip("~") == key), key)
    others = [o for o in overrides if o != line]
    try:
        cfg = _compose(config_name, others, extra)
    except Exception:  # noqa: BLE001 - another override fails too: name this one without a hint
        return f"{line}: there is no key {key} in the config"
    base, meant, own = _nearest_keys(cfg, key)
    where = f"in {base}" if base else "at the top level"
    if meant:
        return f"{line}: there is no key {key}; did you mean {' or '.join(meant)}?"
    shown = ", ".join(own[:25]) + (", …" if len(own) > 25 else "")
    return f"{line}: there is no key {key} ({where}: {shown})"


def _option_error(missing: str, extra: list[Path]) -> str | None:
    group, _, choice = missing.rpartition("/")
    if (
        not group
        or group.startswith(("schema", "hydra"))
        or any(p.startswith("_") for p in missing.split("/"))
    ):
        return None  # a schema or an internal include: not something the user typed
    known = options(group, None, extra)
    close = difflib.get_close_matches(choice, known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of: {', '.join(known)}"
    return f"{group}={choice}: there is no option {choice} in {group}/; {hint}"


def composition_error(task: str, argv: list[str], typed: bool) -> str | None:
    """The one-line error for a command line whose config does not compose: a key that does not
    exist (with the key that does), a group option that does not exist, and — ``typed``, once the
    method schemas are the real ones — a value of the wrong type. ``None`` when it composes or when
    Hydra is better placed to say what is wrong (a malformed override, a plugin it must load)."""
    if any(a.startswith(_NOT_A_RUN) for a in argv):
        return None
    args = _hydra_args(argv)
    if args is None or args.cfg is not None and args.package:
        return None
    if not typed:
        register_signature_schemas()
    config_name = args.config_name or task
    extra = user_config_dirs(argv)
    multirun = args.multirun or any(o.startswith("hparams_search=") for o in args.overrides)
    try:
        lists = list(_compositions(list(args.overrides), multirun, typed))
    except Exception:  # noqa: BLE001 - a malformed override: Hydra's own message says where
        return None
    from hydra import initialize_config_module

    with initialize_config_module("kdx.conf", version_base="1.3"):
        return _first_error(config_name, lists[:_MAX_COMPOSITIONS], extra, typed)


def _first_error(config_name: str, lists: list[list[str]], extra: list[Path], typed: bool) -> str | None:
    from hydra.errors import ConfigCompositionException, MissingConfigException

    for overrides in lists:
        try:
            _compose(config_name, overrides, extra)
        except MissingConfigException as err:
            found = re.search(r"Could not find '([^']+)'", str(err))
            message = _option_error(found.group(1), extra) if found else None
            if message:
                return message
            return None
        except ConfigCompositionException as err:
            text = str(err)
            found = re.match(r"Could not (?:override|delete|append to) '([^']+)'", text)
            if found and "No match in the defaults list" not in text and "Did you mean" not in text:
                return _key_error(config_name, overrides, found.group(1), extra)
            cause = err.__cause__
            if typed and cause is not None and text.startswith("Error merging override"):
                what = str(cause).splitlines()[0]
                return f"{text.removeprefix('Error merging override ')}: {what}"
            return None
        except Exception:  # noqa: BLE001 - anything else: Hydra says it in full
            return None
    return None


def _exit_with(error: str) -> None:
    print(f"kdx: error: {error}", file=sys.stderr)
    sys.exit(2)


_RUN_GROUPS = ("dataset", "student", "teacher")  # kdx-eval's groups that a run's config chose


def run_folder_choices(folder: Path) -> dict[str, str]:
    """The config-group choices a kdx run was composed with (``{}`` when unreadable)."""
    import yaml  # PyYAML, Hydra's own dependency

    try:
        choices = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"][
            "choices"
        ]
    except Exception:  # noqa: BLE001 - an unreadable run config: kdx-eval reports what it needs itself
        return {}
    return {str(k): str(v) for k, v in choices.items() if v is not None} if isinstance(choices, dict) else {}


def run_choices(argv: list[str]) -> list[str]:
    """kdx-eval of a run (``run=<folder>``, or ``ckpt_path=`` inside one): the run's own choices of
    data set, student and teacher (``<run>/.hydra/hydra.yaml``) that this command line does not
    make, to compose before it, so that ``dataset.root=<dir>`` names a key that exists (no ``+``)."""
    folder = None
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("run", "ckpt_path") and value:
            path = Path(value).expanduser()
            folders = [path, *path.resolve().parents] if key == "run" else list(path.resolve().parents)
            folder = next((f for f in folders if (f / ".hydra" / "hydra.yaml").is_file()), None)
    if folder is None:
        return []
    choices = run_folder_choices(folder)
    given = {a.lstrip("+~").partition("=")[0] for a in argv}
    return [f"{g}={choices[g]}" for g in _RUN_GROUPS if choices.get(g) and g not in given]


def front_door(task: str) -> None:
    """``--help`` and the checks that need no torch; returns if the run may go ahead."""
    if task == "eval":
        sys.argv[1:] = [*run_choices(sys.argv[1:]), *sys.argv[1:]]
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        quiet_broken_pipe()
        print(help_text(TOOLS[task], task, user_config_dirs(argv)))
        sys.exit(0)
    error = misspelt_group(argv) or composition_error(task, argv, typed=False)
    if error:
        _exit_with(error)


# the name the tests and older callers use
_front_door = front_door


def launch(task: str, main: Callable[[], Any]) -> None:
    """Run an entry point's Hydra ``main`` after the checks that need the typed method schemas
    (imported with the entry point): a value of the wrong type is one ``kdx: error:`` line too."""
    pipe_safe_stdio()
    error = composition_error(task, sys.argv[1:], typed=True)
    if error:
        _exit_with(error)
    os.environ[SWEEP_KEYS_ENV] = ",".join(swept_keys(sys.argv[1:]))
    main()


def swept_keys(argv: list[str]) -> list[str]:
    """The keys a multirun sweeps on its command line (``method=kd,dkd seed=0,1`` → method, seed):
    what names its jobs (:func:`kdx.console.hydra_job_name`, also in a launcher's worker processes)."""
    args = _hydra_args(argv)
    if args is None or not args.multirun:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(args.overrides))
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return []
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
