"""Small helpers with no kdx dependencies: atomic writes, hashing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a shared cache must follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(path, write)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/Infinity float replaced by ``None``: strict JSON, readable everywhere."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # heavy: kdx-table imports this module and never saves tensors

    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-able object that does not depend on key order."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# Checked cache entries: written under a temporary name, renamed when complete, verified on reuse.
#
# A cache entry's temporary name is ``.<name>.<random>.tmp`` next to it and its lock ``<name>.lock``;
# a writer holds the lock while the temporary exists, so a temporary whose lock nobody holds was left
# by a killed writer (:func:`clean_stale_temps`). An entry that fails its check is renamed
# ``<name>.bad-<time>`` (:func:`move_aside`), never deleted: the bytes stay for a post-mortem.


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (about 0.8 s per GB on one core; 1 ms for the MNIST-1D cache)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """What a record keeps of one file: its size and checksum."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def check_file(path: str | os.PathLike, record: Any) -> str | None:
    """Why ``path`` does not match its ``record`` (:func:`file_record`), or None when it does."""
    path = Path(path)
    if not isinstance(record, dict) or not {"bytes", "sha256"} <= set(record):
        return f"its record has no checksum for {path.name}"
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return (
            f"{path.name} has {size} bytes where its record says {record['bytes']} (truncated or overwritten)"
        )
    if file_sha256(path) != record["sha256"]:
        return f"{path.name} fails its sha256 checksum (its bytes changed after it was written)"
    return None


def is_writable(folder: str | os.PathLike) -> bool:
    """Whether kdx can create files in ``folder`` (creating it if needed): False on a read-only cache."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def temp_path(final: str | os.PathLike, folder: bool = False) -> Path:
    """A fresh temporary name next to ``final`` (a file, or with ``folder`` a created folder)
    that :func:`clean_stale_temps` recognises; permissions follow the umask (a shared cache)."""
    final = Path(final)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def lock_path(final: str | os.PathLike) -> Path:
    """The lock a writer of cache entry ``final`` holds (``<name>.lock`` next to it)."""
    final = Path(final)
    return final.with_name(final.name + ".lock")


def remove(path: str | os.PathLike) -> None:
    import shutil

    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temps(folder: str | os.PathLike, held: str | os.PathLike | None = None) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``: those of entry ``held`` (whose
    lock the caller holds) and any other whose lock no live process holds. Returns what was removed."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in sorted(folder.glob(".*.tmp")):
        name = tmp.name[1 : -len(".tmp")].rsplit(".", 1)[0]
        if not name:
            continue
        if held is not None and name == Path(held).name:
            remove(tmp)
            removed.append(tmp)
            continue
        try:
            with FileLock(str(lock_path(folder / name)), timeout=0):
                if tmp.exists():
                    remove(tmp)
                    removed.append(tmp)
        except (Timeout, OSError):  # a live writer holds it (or the lock cannot be made): leave it
            continue
    return removed


def move_aside(path: str | os.PathLike, reason: str) -> Path:
    """Rename a cache entry that failed its check to ``<name>.bad-<time>`` (kept for a post-mortem)."""
    import time

    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bad = path.with_name(f"{path.name}.bad-{stamp}")
    n = 1
    while bad.exists():
        bad = path.with_name(f"{path.name}.bad-{stamp}-{n}")
        n += 1
    os.replace(path, bad)
    return bad
