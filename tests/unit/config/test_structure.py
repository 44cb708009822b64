"""The seams of docs/architecture.md, held by the code: one builder, typed contexts, a declared data
protocol, one run record, a config tree that holds only what differs from the code's defaults."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src" / "kdx"


def _python_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in sorted(folder.rglob("*.py"))]


def _hits(pattern: str, files: list[Path]) -> list[str]:
    regex = re.compile(pattern)
    return [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if regex.search(line)
    ]


def test_one_place_builds_the_lightning_module():
    sites = _hits(r"\bDistillationModule\(", _python_files(SRC))
    sites = [s for s in sites if "class DistillationModule(" not in s]
    assert [s.split(":")[0] for s in sites] == ["src/kdx/pipeline/build.py"], sites


def test_methods_get_a_typed_context_not_an_untyped_host():
    # tests included: a test that fakes the context with a namespace would hide a missing field
    files = _python_files(SRC, ROOT / "tests")
    assert _hits(r"host: Any|SimpleNamespace", [f for f in files if f.name != "test_structure.py"]) == []


def test_only_the_data_protocol_probes_a_data_module():
    files = [f for f in _python_files(SRC) if f != SRC / "data" / "base.py"]
    assert _hits(r"(getattr|hasattr)\((datamodule|dm|self\.datamodule|trainer\.datamodule)\b", files) == []


def test_metrics_json_has_one_definition_that_every_reader_uses():
    readers = ["table.py", "hydra_callbacks.py", "pipeline/run.py", "pipeline/record.py", "teacher/auto.py"]
    for reader in readers:
        assert re.search(r"from kdx\.record import", (SRC / reader).read_text()), reader
    assert re.search(r"from kdx\.table import", (SRC / "runs.py").read_text())  # kdx-table's reading
    # nobody but the record parses a metrics.json by hand
    assert _hits(r"json\.loads?\(.*metrics", _python_files(SRC)) == []


def test_the_config_tree_stays_small():
    assert len(list((ROOT / "conf").rglob("*.yaml"))) <= 125
