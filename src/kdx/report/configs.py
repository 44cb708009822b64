"""What differs between runs: each run's resolved config flattened to dotted keys, the keys whose
values differ, and those values printed readably (``hidden=[100,100]``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# never a difference between configs: the seed (a row's runs differ in it by design), the published
# numbers compared with (not a training setting), where a run writes (paths.*, hydra.*), and what
# it resumed from
IGNORED_KEYS = ("seed", "ckpt_path", "published")
IGNORED_PREFIXES = ("paths.", "hydra.", "published.")
ABSENT = "–"  # the value of a key a run's config does not have


def flatten(config: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1, "c": [1, 2]}}`` → ``{"a.b": 1, "a.c": [1, 2]}``: mappings are walked, every
    other value (lists included) is a leaf; an empty mapping is a leaf of its own."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def show(value: Any) -> str:
    """A config value as a person reads it: ``[100,100]``, ``{a:1,b:[2,3]}``, ``null``, ``true``, ``0.5``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return (
            "{"
            + ",".join(f"{k}:{show(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)  # 1.0 stays 1.0: an int 1 is another value (limit_*_batches)
    return str(value)


def _ignored(key: str, value: Any, run_dir: Path | None) -> bool:
    if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
        return True
    # a path inside the run's own folder (checkpoint dirpath, logger save_dir, default_root_dir)
    if isinstance(value, str) and run_dir is not None:
        return value == str(run_dir) or value.startswith(str(run_dir) + "/")
    return False


def comparable(config: Mapping[str, Any] | None, run_dir: Path | None = None) -> dict[str, str]:
    """The flattened config as shown values, without the keys that differ between any two runs of
    the same config (seed, paths, the run's own folder)."""
    return {k: show(v) for k, v in flatten(config).items() if not _ignored(k, v, run_dir)}


def differing(
    configs: Sequence[Mapping[str, str]], within: Iterable[Sequence[int]] | None = None
) -> list[str]:
    """The keys whose shown values differ between ``configs`` (a key missing in some counts as
    differing); with ``within`` (groups of indices), only keys that differ inside some group."""
    groups = [list(range(len(configs)))] if within is None else [list(g) for g in within]
    keys: set[str] = set()
    for group in groups:
        members = [configs[i] for i in group]
        for key in set().union(*members) if members else ():
            if len({m.get(key, ABSENT) for m in members}) > 1:
                keys.add(key)
    return sorted(keys)


def lookup(config: Mapping[str, Any] | None, dotted: str) -> tuple[bool, Any]:
    """(found, value) of a dotted path in a nested config."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node
