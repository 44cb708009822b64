"""One process per run folder: an advisory lock (``flock``) on ``<run folder>/.kdx.lock``.

The kernel drops a ``flock`` when its process dies, so the lock of a killed run is free at once and
the next run takes it over; the file holds the holder's pid, which a refused run names.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".kdx.lock"
_held: dict[Path, int] = {}  # folder -> open descriptor holding its lock, in this process


class FolderInUse(Exception):
    def __init__(self, folder: Path, pid: str):
        self.folder, self.pid = folder, pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"run folder {folder} is in use by {holder} (another kdx run); wait for it to finish, "
            "or give this run its own folder (hydra.run.dir=<new folder>)"
        )


def holder(folder: Path) -> str:
    try:
        return (folder / LOCK_NAME).read_text().strip()
    except OSError:
        return ""


def acquire(folder: str | os.PathLike) -> None:
    """Own ``folder`` for this process (again: a no-op); :class:`FolderInUse` when another holds it.
    A refused run leaves the folder as it found it."""
    folder = Path(folder).resolve()
    if folder in _held:
        return
    path = folder / LOCK_NAME
    if path.is_file():  # probe without creating anything: a busy folder is not touched
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(folder, holder(folder)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(folder, holder(folder)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[folder] = fd


def release(folder: str | os.PathLike) -> None:
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
