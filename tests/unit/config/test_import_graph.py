"""kdx's modules import each other without a cycle, counting imports inside functions too: a cycle
hidden in a function still ties the modules together (neither can be read, tested or moved alone)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src"


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``src``: dotted name -> file (a package is its ``__init__``)."""
    names = {}
    for path in (src / package).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (relative imports resolved;
    ``from a import b`` counts ``a.b`` when it is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
                base = ".".join([*parts[:keep], *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    # a package's __init__ re-exporting its own children is not a cycle with them
    return {t for t in found if t != name and not (path.name == "__init__.py" and t.startswith(name + "."))}


def import_cycles(src: Path, package: str) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    modules = module_names(src, package)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_kdx_has_no_import_cycle():
    cycles = import_cycles(SRC, "kdx")
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_check_finds_a_cycle_hidden_in_a_function_and_a_relative_import(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from toy.a import run\n")
    (pkg / "a.py").write_text("from toy.sub import b\n\ndef run():\n    return b.helper()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def helper():\n    from ..c import late\n    return late()\n")
    (pkg / "c.py").write_text("def late():\n    import toy.a\n    return toy.a\n")
    (pkg / "d.py").write_text("import toy.c\n")  # imports into the cycle, not part of it
    assert import_cycles(tmp_path, "toy") == [["toy.a", "toy.c", "toy.sub.b"]]
    (pkg / "c.py").write_text("def late():\n    return None\n")
    assert import_cycles(tmp_path, "toy") == []
