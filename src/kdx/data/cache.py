"""Checked data caches: a file of tensors that is verified every time it is reused.

:func:`load_or_build` keeps ``build()``'s tensors in ``<name>`` (``torch.save``, read back with
``weights_only=True``) and a record ``<name>.json`` beside it: the file's size and sha256, the
shape and dtype of every tensor, and the size and sha256 of each companion file (a tokenizer folder
built with the data). Both are written under a temporary name and renamed when complete, under the
entry's lock (``<name>.lock``, :mod:`filelock`), and temporaries left by a killed writer are removed
on the next use (:func:`kdx.utils.clean_stale_temps`).

On reuse the record is checked first; an entry that fails (truncated, bytes changed, record missing
or unreadable, tensors of another shape) is moved aside to ``<name>.bad-<time>`` with the reason
logged once, and rebuilt. In a read-only cache folder nothing can be moved or written: the data is
built in memory for this run with one warning naming the file and what is wrong (or, where the
entry has companions that must exist on disk, one :class:`~kdx.errors.KDXError` line).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from kdx.errors import KDXError
from kdx.utils import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_file,
    clean_stale_temps,
    file_record,
    file_sha256,
    is_writable,
    lock_path,
    move_aside,
    stable_hash,
)

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
_DIGESTS: dict[tuple[str, int, int], str] = {}


def content_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a data file's bytes: what names the data in every cache key, so a moved or copied
    folder is the same data. Hashed once per (resolved path, size, mtime): remembered for the
    process and, with ``cache_dir``, in ``<cache_dir>/digests/`` for the next ones (a file changed
    in place has a new size or mtime, hence a new entry)."""
    file = Path(path).resolve()
    stat = file.stat()
    memo = (str(file), stat.st_size, stat.st_mtime_ns)
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    stored = Path(cache_dir) / "digests" / f"{stable_hash(list(memo), length=24)}.txt" if cache_dir else None
    digest = None
    if stored is not None and stored.is_file():
        text = stored.read_text().strip()
        digest = text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None
    if digest is None:
        digest = file_sha256(file)
        if stored is not None and is_writable(stored.parent):
            atomic_write_text(stored, digest + "\n")
    _DIGESTS[memo] = digest
    return digest


def describe_tensors(value: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{dotted key: {"shape", "dtype"}}`` of every tensor in a nested dict."""
    out: dict[str, dict[str, Any]] = {}
    if isinstance(value, torch.Tensor):
        out[prefix or "."] = {"shape": list(value.shape), "dtype": str(value.dtype)}
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            out.update(describe_tensors(value[key], f"{prefix}.{key}" if prefix else str(key)))
    return out


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _companion_files(path: Path, companions: Sequence[Path]) -> dict[str, dict[str, Any]]:
    files = {}
    for companion in companions:
        found = (
            sorted(p for p in Path(companion).rglob("*") if p.is_file())
            if Path(companion).is_dir()
            else [Path(companion)]
        )
        for file in found:
            files[str(file.relative_to(path.parent))] = file_record(file)
    return files


def check_entry(path: Path, companions: Sequence[Path] = ()) -> tuple[dict | None, str | None]:
    """``(tensors, None)`` when the entry at ``path`` passes its checks, ``(None, why)`` when it fails,
    ``(None, None)`` when there is no entry."""
    record_file = record_path(path)
    if not path.exists():
        return None, None  # absent (a record without its file is stale: rebuilt quietly)
    if not record_file.is_file():
        return None, f"has no record {record_file.name} (written by an older kdx, or its writer was killed)"
    try:
        record = json.loads(record_file.read_text())
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise ValueError("not a kdx cache record")
    except (ValueError, OSError) as error:
        return None, f"its record {record_file.name} is unreadable ({type(error).__name__}: {error})"
    problem = check_file(path, record.get("file"))
    if problem is None:
        for name, entry in record.get("companions", {}).items():
            problem = check_file(path.parent / name, entry)
            if problem is not None:
                problem = f"its companion {problem}"
                break
    if problem is None and any(not Path(c).exists() for c in companions):
        problem = "a companion folder is missing"
    if problem is not None:
        return None, problem
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read is a damaged entry
        return None, f"cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if describe_tensors(value) != record.get("tensors"):
        return None, "its tensors' shapes or dtypes differ from its record"
    return value, None


def load_or_build(
    path: str | Path,
    build: Callable[[], dict],
    what: str = "data",
    companions: Sequence[Path] = (),
) -> dict:
    """``build()``'s tensors, cached and checked at ``path`` (see the module docstring).

    ``companions``: files or folders that ``build`` writes beside ``path`` and that belong to the
    entry (checked, and moved aside with it)."""
    path = Path(path)
    folder = path.parent
    value, problem = check_entry(path, companions)
    if value is not None:
        if any(folder.glob(".*.tmp")) and is_writable(folder):  # a killed writer's leftovers
            for stale in clean_stale_temps(folder):
                log.warning("%s cache: removed %s, left by a killed writer", what, stale)
        return value
    if not is_writable(folder):
        why = problem or "is missing"
        fix = "make it writable, or point paths.cache_dir to a writable folder"
        if companions:
            raise KDXError(f"{what} cache {path} {why}, and {folder} is read-only: {fix}")
        log.warning(
            "%s cache %s %s, and %s is read-only: built in memory for this run (%s)",
            what,
            path,
            why,
            folder,
            fix,
        )
        return build()
    with FileLock(str(lock_path(path))):
        for stale in clean_stale_temps(folder, held=path):
            log.warning("%s cache: removed %s, left by a killed writer", what, stale)
        value, problem = check_entry(path, companions)  # another job may have rebuilt it meanwhile
        if value is not None:
            return value
        if problem is not None:
            bad = move_aside(path, problem)
            for extra in [record_path(path), *companions]:
                if Path(extra).exists():
                    move_aside(extra, problem)
            log.warning("%s cache %s %s: moved aside to %s and rebuilt", what, path, problem, bad.name)
        record_path(path).unlink(missing_ok=True)
        value = build()
        atomic_torch_save(value, path)
        atomic_write_json(
            record_path(path),
            {
                "format": RECORD_FORMAT,
                "file": file_record(path),
                "tensors": describe_tensors(value),
                "companions": _companion_files(path, companions),
            },
        )
        return value
