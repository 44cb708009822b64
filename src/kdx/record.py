"""The run record: metrics.json as one type (stand-in with the agreed API; the typed version with a
field per key replaces it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdx.utils import atomic_write_json

SCHEMA_VERSION: int = 1


class RecordError(ValueError):
    """A file that is not a run record."""


@dataclass
class RunRecord:
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        if not isinstance(data, dict):
            raise RecordError(f"a run record is a mapping, not {type(data).__name__}")
        return cls({k: v for k, v in data.items() if k != "schema_version"})

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "schema_version": SCHEMA_VERSION}

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)


def read_record(path: str | os.PathLike) -> RunRecord:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        return RunRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise RecordError(f"{path}: not a run record ({err})") from err


def write_record(path: str | os.PathLike, record: RunRecord) -> None:
    atomic_write_json(path, record.to_dict())
