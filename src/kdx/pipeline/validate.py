"""Check a composed run config before any work: no data generated, no teacher trained, on a bad value.

:func:`validate_config` is the first step of :func:`kdx.pipeline.run.run`. Everything that can be judged
from the config alone is judged here, and the first problems found become one
:class:`~kdx.errors.KDXError` line that names the key and the fix:

* types and ranges: ``seed`` (an integer), every learning rate (finite, > 0), the batch sizes
  (integers > 0), ``trainer.max_epochs`` and the auto-teacher's ``teacher.train.epochs`` (>= 1),
  the speed switches ``channels_last`` (auto, true, false) and ``compile`` (a bool or a backend);
* the resume path ``ckpt_path``: an existing file, a run folder (its ``checkpoints/last.ckpt``) or
  ``last`` (this run's own ``checkpoints/last.ckpt``); anything else is an error, never a silent
  fresh start. The resolved file replaces the value in the config;
* model names: kdx's zoo, timm's and torchvision's registries;
* keys that nothing reads. Two sources, neither a hand-kept list:

  - every ``_target_`` node is compared with its target's signature: a key the callable does not
    take (and that no ``**kwargs`` swallows) is reported;
  - every key added on the command line with ``+`` (Hydra's own hint for a key the config lacks)
    is looked up in the config composed without those keys: added under a ``_target_`` node, the
    signature decides; added under a mapping the config declares empty (``teacher.train.method_args:
    {}``), it is passed on and fine; anywhere else no code reads it, and it is an error.

  ``student.name`` / ``teacher.name`` are display names (run folders, tables, provenance). Where the
  group derives the name from the model (``student=timm``: ``name: timm_${.model.name}``) a user who
  sets ``student.name=<something>`` almost surely meant the model: that is an error pointing at
  ``student.model.name``. A fixed display name (``student=mlp``) may be renamed freely.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torchvision
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import kdx.conf
from kdx.errors import KDXError
from kdx.models.registry import list_models
from kdx.pipeline.switches import channels_last_switch, compile_switch, cpu_allocator_switch

# Hydra's instantiate keys: read by Hydra, never passed to the target
_INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# factories whose ``name`` is looked up in a registry (kdx.models.registry)
_ZOO_FACTORY = "kdx.models.registry.create_model"
_TIMM_FACTORY = "kdx.models.registry.timm_model"
_TORCHVISION_FACTORY = "kdx.models.registry.torchvision_model"
_MAX_REPORTED = 3


def validate_config(
    cfg: DictConfig, overrides: list[str] | None = None, reference: DictConfig | None = None
) -> None:
    """Raise one :class:`KDXError` naming the first problems of ``cfg``; resolve ``cfg.ckpt_path``.

    ``overrides`` are the command line's task overrides and ``reference`` the config composed from
    them without the ``+key`` ones; inside ``kdx-train`` both come from Hydra when not given. The
    teacher's own run (``task_name: teacher``) is composed by kdx and only has its values checked.
    """
    problems = [*_value_problems(cfg), *_model_name_problems(cfg), *_signature_problems(cfg)]
    if cfg.get("task_name") != "teacher":
        if overrides is None:
            overrides, reference = _hydra_overrides_and_reference()
        problems += _added_key_problems(cfg, overrides or [], reference)
        problems += _display_name_problems(cfg, overrides or [])
    if problems:
        shown = problems[:_MAX_REPORTED]
        more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
        raise KDXError("; ".join(shown) + more)
    resolved = resolve_ckpt_path(cfg)
    if resolved is not None and resolved != cfg.get("ckpt_path"):
        with open_dict(cfg):
            cfg.ckpt_path = resolved


# ---------------------------------------------------------------------------------------------
# Values


def _select(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``, resolved; ``None`` when absent or not resolvable here."""
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - an unresolvable value is judged where it is used
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_problems(cfg: DictConfig) -> Iterator[str]:
    seed = cfg.get("seed")
    if not _is_int(seed):
        yield f"seed={seed!r} is not an integer; pass seed=<int>, e.g. seed=0"
    auto_teacher = _select(cfg, "teacher.model") is not None and str(_select(cfg, "teacher.ckpt")) == "auto"
    lr_keys = ["optim.optimizer.lr", *(["teacher.train.optim.optimizer.lr"] if auto_teacher else [])]
    for key in lr_keys:
        lr = _select(cfg, key)
        if lr is not None and not (_is_number(lr) and math.isfinite(lr) and lr > 0):
            yield f"{key}={lr!r} is not a learning rate; pass a finite number > 0, e.g. {key}=0.01"
    for key in ("dataset.datamodule.batch_size", "dataset.datamodule.eval_batch_size"):
        size = _select(cfg, key)
        if size is not None and not (_is_int(size) and size > 0):
            yield f"{key}={size!r} is not a batch size; pass an integer > 0, e.g. {key}=64"
    yield from _epoch_problems(cfg, auto_teacher)
    yield from _switch_problems(cfg)
    yield from _name_problems(cfg)
    yield from _device_problems(cfg)
    yield from _input_kind_problems(cfg)


def _data_input_kind(cfg: DictConfig) -> str | None:
    """The data module's declared ``input_kind`` (:class:`kdx.data.base.KDDataModule`), read from its
    class: nothing is built. ``None`` when the target is not importable here (Hydra says so later)."""
    target = _select(cfg, "dataset.datamodule._target_")
    if not isinstance(target, str):
        return None
    try:
        data_class = get_class(target)
    except Exception:  # noqa: BLE001 - an unknown target is Hydra's error, raised at instantiation
        return None
    return str(getattr(data_class, "input_kind", "dense"))


def _model_input_kind(node: Any) -> str:
    """What a model config's target reads: its declared ``input_kind`` (``"tokens"`` for the Hugging
    Face adapter, :func:`kdx.models.hf.hf_model`); every other model reads dense tensors."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str):
        return "dense"
    try:
        return str(getattr(_locate(target), "input_kind", "dense"))
    except Exception:  # noqa: BLE001 - an unknown target is Hydra's error, raised at instantiation
        return "dense"


def _input_kind_problems(cfg: DictConfig) -> Iterator[str]:
    """Token data (batches of token-id dicts) with a model that reads tensors, or language-modelling
    data with a classifier (or the other way round), or a token-level method on anything but a causal
    LM: said before any work (the model would otherwise fail deep inside its first forward)."""
    data_kind = _data_input_kind(cfg)
    dataset = _select(cfg, "dataset.name")
    yield from _method_kind_problems(cfg, data_kind)
    if data_kind == "lm":
        for role in ("student", "teacher"):
            node = _select(cfg, f"{role}.model")
            if node is None or _model_input_kind(node) == "lm":
                continue
            yield (
                f"{role}={_select(cfg, f'{role}.name')} is not a causal language model, but dataset={dataset} is "
                f"language modelling; pick a causal LM (e.g. {role}=gpt2_l1_h32, {role}=llama_l1_h32)"
            )
        return
    if data_kind != "tokens":
        for role in ("student", "teacher"):
            node = _select(cfg, f"{role}.model")
            if node is not None and _model_input_kind(node) == "lm":
                yield (
                    f"{role}={_select(cfg, f'{role}.name')} is a causal language model, but dataset={dataset} is "
                    "not language modelling; use dataset=lm (e.g. experiment=lm/synthetic)"
                )
        return
    length = _select(cfg, "dataset.datamodule.max_length")
    if length is not None and not (_is_int(length) and length >= 2):
        yield (
            f"dataset.datamodule.max_length={length!r} cannot hold a sentence; pass an integer >= 2 "
            "([CLS] and [SEP] take two tokens), e.g. dataset.datamodule.max_length=64"
        )
    for role in ("student", "teacher"):
        node = _select(cfg, f"{role}.model")
        if node is None or _model_input_kind(node) == "tokens":
            continue
        yield (
            f"{role}={_select(cfg, f'{role}.name')} reads tensors, but dataset={dataset} gives batches of "
            f"token ids; pick a {role} made for this data (a text model, e.g. {role}=bert_l2_h32 or "
            f"{role}=hf) or a data set it can read"
        )


def _method_kind_problems(cfg: DictConfig, data_kind: str | None) -> Iterator[str]:
    """A token-level method (``DistillationMethod.token_level``) needs language-modelling data, and
    on such data only token-level methods (and the student alone) train."""
    target = _select(cfg, "method._target_")
    if not isinstance(target, str) or data_kind is None:
        return
    try:
        method = _locate(target)
    except Exception:  # noqa: BLE001 - an unknown target is Hydra's error, raised at instantiation
        return
    token_level = bool(getattr(method, "token_level", False))
    needs_teacher = getattr(getattr(method, "teacher_use", None), "needs_teacher", True)
    name = _select(cfg, "method.name") or getattr(method, "name", target)
    if token_level and data_kind != "lm":
        yield (
            f"method={name} distils a causal language model token by token, but dataset={_select(cfg, 'dataset.name')} "
            "is not language modelling; use dataset=lm, e.g. experiment=lm/synthetic"
        )
    elif data_kind == "lm" and needs_teacher and not token_level:
        yield (
            f"method={name} distils classifiers, but dataset={_select(cfg, 'dataset.name')} is language modelling; "
            "pick a token-level method: fkl, rkl, jsd, skl, srkl, tvd, gkd, seqkd (or none)"
        )


def _name_problems(cfg: DictConfig) -> Iterator[str]:
    """Names become file and folder names (the teacher cache, the run folder): none may leave them."""
    for key in ("teacher.name", "student.name", "dataset.name", "label"):
        name = _select(cfg, key)
        if name is None:
            continue
        text = str(name)
        if "/" in text or "\\" in text or text in (".", "..") or text.startswith("..") or "\0" in text:
            yield (
                f"{key}={text!r} would leave its folder (names become file and folder names); "
                f"pass a plain name without '/' or '..', e.g. {key}=my_model"
            )


def _device_problems(cfg: DictConfig) -> Iterator[str]:
    """``trainer=gpu`` / ``trainer.devices`` on a machine without the device: said before any work
    (an auto-teacher would otherwise start training first)."""
    accelerator = str(_select(cfg, "trainer.accelerator") or "auto")
    if accelerator not in ("gpu", "cuda"):
        return
    import torch  # only when a GPU is asked for

    available = torch.cuda.device_count()
    devices = _select(cfg, "trainer.devices")
    wanted = devices if _is_int(devices) else len(devices) if isinstance(devices, (list, tuple)) else 1
    if available == 0:
        yield (
            f"trainer.accelerator={accelerator}, but this machine has no GPU that torch can use; "
            "pass trainer=cpu (or trainer.accelerator=cpu), or run on a machine with a GPU"
        )
    elif _is_int(wanted) and wanted > available:
        yield (
            f"trainer.devices={devices} asks for {wanted} GPUs, but this machine has {available}; "
            f"pass trainer.devices={available} or fewer"
        )


def _switch_problems(cfg: DictConfig) -> Iterator[str]:
    """The speed switches, judged by the builder's own parsers (so the two cannot disagree)."""
    trainer = cfg.get("trainer") or {}
    checks = (
        lambda: channels_last_switch(
            cfg.get("channels_last", False),
            str(trainer.get("accelerator", "auto")),
            str(trainer.get("precision", "32-true")),
        ),
        lambda: compile_switch(cfg.get("compile", False)),
        lambda: cpu_allocator_switch(cfg.get("cpu_allocator", "retain")),
    )
    for check in checks:
        try:
            check()
        except KDXError as error:
            yield str(error)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _epoch_problems(cfg: DictConfig, auto_teacher: bool) -> Iterator[str]:
    epochs, steps = _select(cfg, "trainer.max_epochs"), _select(cfg, "trainer.max_steps")
    open_ended = epochs is None or epochs == -1  # Lightning: the run's length is then max_steps
    if open_ended and _is_int(steps) and steps > 0:
        pass
    elif not (_is_int(epochs) and epochs >= 1) and not _select(cfg, "trainer.fast_dev_run"):
        yield (
            f"trainer.max_epochs={epochs!r} trains nothing; pass an integer >= 1 "
            "(or trainer.max_epochs=-1 with trainer.max_steps=<steps>)"
        )
    batches = _select(cfg, "trainer.limit_train_batches")
    if _is_number(batches) and batches <= 0 and not _select(cfg, "trainer.fast_dev_run"):
        yield (
            f"trainer.limit_train_batches={batches!r} trains nothing; pass a fraction in (0, 1] or a number "
            "of batches >= 1"
        )
    if auto_teacher:
        teacher_seed = _select(cfg, "teacher.train.seed")
        if not _is_int(teacher_seed):
            yield f"teacher.train.seed={teacher_seed!r} is not an integer; pass teacher.train.seed=<int>"
        teacher_epochs = _select(cfg, "teacher.train.epochs")
        if not (_is_int(teacher_epochs) and teacher_epochs >= 1):
            yield (
                f"teacher.train.epochs={teacher_epochs!r} cannot train the auto-teacher; pass an integer "
                ">= 1, or teacher.ckpt=<path> to use trained weights"
            )


# ---------------------------------------------------------------------------------------------
# The resume path


def named_run_checkpoint(path: Path) -> Path:
    """``path`` if a file; a run folder's ``checkpoints/last.ckpt`` (or ``last.ckpt``, or, for a run
    stopped in its pre-training phase, ``checkpoints/init/last.ckpt``) if a folder holds one; else
    ``path`` unchanged (the caller reports it)."""
    if path.is_dir():
        checkpoints = path / "checkpoints"
        for candidate in (checkpoints / "last.ckpt", path / "last.ckpt", checkpoints / "init" / "last.ckpt"):
            if candidate.is_file():
                return candidate
    return path


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint file a run resumes from, or ``None`` for a fresh start; an error when a resume
    was asked for and there is nothing to resume from (Lightning would silently start afresh)."""
    value = cfg.get("ckpt_path")
    if value is None or str(value) == "":
        return None
    text = str(value)
    if text == "last":
        output_dir = _select(cfg, "paths.output_dir")
        own = Path(str(output_dir)) / "checkpoints" / "last.ckpt"
        if output_dir is not None and own.is_file():
            return str(own)
        raise KDXError(
            f"ckpt_path=last: this run's folder {output_dir} has no checkpoints/last.ckpt (every new run "
            "gets a new folder); to resume a run pass ckpt_path=<its run folder> or "
            "ckpt_path=<run folder>/checkpoints/last.ckpt"
        )
    path = named_run_checkpoint(Path(text).expanduser())
    if path.is_dir():
        raise KDXError(
            f"ckpt_path={text} is a folder without checkpoints/last.ckpt: nothing to resume from; pass the "
            "run folder of a run that saved one, or the .ckpt file itself"
        )
    if not path.is_file():
        raise KDXError(
            f"ckpt_path={text} does not exist: nothing to resume from; pass an existing checkpoint "
            "(e.g. <run folder>/checkpoints/last.ckpt), a run folder, or ckpt_path=null to start afresh"
        )
    return str(path)


# ---------------------------------------------------------------------------------------------
# Model names


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every mapping with a ``_target_`` in ``node`` (Hydra's own ``hydra`` node excluded)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            if not path and key == "hydra":
                continue
            try:
                child = node._get_node(key)
            except Exception:  # noqa: BLE001 - a missing value has no children
                continue
            yield from _target_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False)):
            yield from _target_nodes(child, f"{path}[{i}]")


def _model_name_problems(cfg: DictConfig) -> Iterator[str]:
    for path, node in _target_nodes(cfg):
        target = str(node._get_node("_target_")._value())
        if target not in (_ZOO_FACTORY, _TIMM_FACTORY, _TORCHVISION_FACTORY):
            continue
        name = _select(node, "name")
        if not isinstance(name, str):
            continue
        known, where = _registry(target)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            yield f"{path}.name={name} is not a {where} model{hint}; pass {path}.name=<a {where} model name>"


def _registry(target: str) -> tuple[list[str], str]:
    if target == _ZOO_FACTORY:
        return list_models(), "kdx zoo (docs/zoo.md)"
    if target == _TIMM_FACTORY:
        return timm.list_models(), "timm (timm.list_models())"
    return torchvision.models.list_models(), "torchvision (torchvision.models.list_models())"


# ---------------------------------------------------------------------------------------------
# Keys nothing reads


def _locate(target: str) -> Any:
    """The object a dotted ``_target_`` names: the longest importable module prefix, then attributes
    (like Hydra's, but quiet: Hydra's own lookup logs an error for an unknown target)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def _signature(target: str) -> inspect.Signature | None:
    try:
        return inspect.signature(_locate(target))
    except Exception:  # noqa: BLE001 - an unknown target is Hydra's error, raised at instantiation
        return None


def _takes(signature: inspect.Signature, key: str) -> bool:
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    return any(p.name == key and p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)


def _signature_problems(cfg: DictConfig) -> Iterator[str]:
    for path, node in _target_nodes(cfg):
        target = node._get_node("_target_")._value()
        signature = _signature(str(target)) if isinstance(target, str) else None
        if signature is None:
            continue
        ignored = [
            str(k) for k in node.keys() if k not in _INSTANTIATE_KEYS and not _takes(signature, str(k))
        ]
        for key in ignored:
            close = difflib.get_close_matches(key, list(signature.parameters), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            yield f"{path}.{key} is not read: {target} takes no argument '{key}'{hint}; remove it"


def _added_key_problems(cfg: DictConfig, overrides: list[str], reference: DictConfig | None) -> Iterator[str]:
    """Keys added with ``+key=value`` that no code reads (see the module docstring)."""
    if reference is None:
        return
    for key in _added_keys(overrides):
        parts = key.split(".")
        depth = 0  # the deepest ancestor the config declares without the added keys
        while depth < len(parts) - 1 and isinstance(
            OmegaConf.select(reference, ".".join(parts[: depth + 1])), DictConfig
        ):
            depth += 1
        anchor_path = ".".join(parts[:depth])
        anchor = OmegaConf.select(reference, anchor_path) if anchor_path else reference
        if isinstance(anchor, DictConfig) and "_target_" in anchor:
            continue  # the signature check above has judged it
        if isinstance(anchor, DictConfig) and len(anchor) == 0 and anchor_path:
            continue  # a mapping declared empty ({}) is passed on whole, e.g. teacher.train.method_args
        if _instantiable_collection(anchor) and _has_target(
            OmegaConf.select(cfg, ".".join(parts[: depth + 1]))
        ):
            continue  # one more callback / logger: instantiated like its siblings, its keys checked above
        added = ".".join(parts[: depth + 1])
        where = f"'{anchor_path}'" if anchor_path else "the top level"
        same_name = _same_settings(reference, anchor_path, parts[-1])
        fix = (
            f"the setting is {' or '.join(same_name[:3])} (without '+')"
            if same_name
            else "for an existing setting drop the '+' and use its real key"
        )
        yield f"+{key}: no kdx code reads '{added}' (it is not in the config of {where}); remove it — {fix}"


# the same setting under another name in another part of the config (the student's trainer counts
# max_epochs, the auto-teacher's recipe epochs)
_SAME_SETTING = {"max_epochs": ("epochs",), "epochs": ("max_epochs",)}


def _same_settings(reference: DictConfig, anchor_path: str, name: str) -> list[str]:
    """The settings a misplaced ``+<anchor>.<...>.<name>`` most likely meant: those named ``name`` (or
    its synonym) under the same node; where that node has some, others only where they are the same
    setting of another copy of the node (``teacher.train.optim.optimizer.lr`` for ``optim.lr``), so
    that ``+teacher.train.max_epochs`` is not sent to the student's ``trainer.max_epochs``."""
    names = {name, *_SAME_SETTING.get(name, ())}
    found = [k for k in _leaf_keys(reference) if k.rsplit(".", 1)[-1] in names]
    under = [k for k in found if anchor_path and k.startswith(f"{anchor_path}.")]
    if under:
        found = [k for k in found if k in under or any(k.endswith(f".{u}") for u in under)]
    else:
        found = [k for k in found if k.rsplit(".", 1)[-1] == name]  # a synonym only within its node
    return sorted(found, key=lambda k: (k not in under, len(k)))


def _leaf_keys(node: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of every value in ``node`` (Hydra's own ``hydra`` node excluded)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if path or key != "hydra":
                yield from _leaf_keys(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif path:
        yield path


def _has_target(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _instantiable_collection(node: Any) -> bool:
    """A mapping whose entries are all ``_target_`` nodes (or switched off): callbacks, loggers."""
    if not isinstance(node, DictConfig) or len(node) == 0:
        return False
    children = [node._get_node(k) for k in node.keys()]
    return all(_has_target(c) or c is None or c._is_none() for c in children)


def _added_keys(overrides: list[str]) -> list[str]:
    """Keys (not config groups) that ``+key=value`` overrides add."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        o.key_or_group for o in parsed if o.is_add() and o.package is None and not _is_group(o.key_or_group)
    ]


def _is_group(key: str) -> bool:
    try:
        return bool(GlobalHydra.instance().config_loader().repository.group_exists(key.replace(".", "/")))
    except Exception:  # noqa: BLE001 - outside a Hydra app: kdx's own config folder decides
        return (Path(kdx.conf.__file__).parent / key.replace(".", "/")).is_dir()


def _hydra_overrides_and_reference() -> tuple[list[str], DictConfig | None]:
    """The command line's task overrides and the config composed without its ``+key`` ones."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not inside a Hydra app (tests, library use): nothing was added on a command line
        return [], None
    overrides = list(hydra_cfg.overrides.task)
    added = set(_added_keys(overrides))
    if not added:
        return overrides, None
    parsed = OverridesParser.create().parse_overrides(overrides)
    kept = [
        text
        for text, o in zip(overrides, parsed, strict=True)
        if o.key_or_group not in added or not o.is_add()
    ]
    return overrides, compose(config_name=hydra_cfg.job.config_name, overrides=kept)


def _display_name_problems(cfg: DictConfig, overrides: list[str]) -> Iterator[str]:
    set_keys = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(list(overrides))}
    for role in ("student", "teacher"):
        override = set_keys.get(f"{role}.name")
        if override is None or override.is_add():
            continue
        if _derived_name(role, _group_choice(role, overrides)):
            yield (
                f"{role}.name={override.value()} renames the run but picks no model ({role}.name is derived "
                f"from {role}.model.name); to choose the model pass {role}.model.name={override.value()}"
            )


def _group_choice(group: str, overrides: list[str]) -> str | None:
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == group]
        return chosen[-1] if chosen else None


def _derived_name(group: str, choice: str | None) -> bool:
    """Whether the group option's own file makes ``name`` an interpolation of its model's name."""
    if not choice:
        return False
    path = Path(kdx.conf.__file__).parent / group / f"{choice}.yaml"
    if not path.is_file():
        return False
    raw = OmegaConf.load(path)
    name = raw._get_node("name") if "name" in raw else None
    text = str(name._value()) if name is not None else ""
    return "${" in text and "model" in text
