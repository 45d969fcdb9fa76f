"""The server package's shape: no import cycles between its modules, and local servers log under the
data dir, never into the working directory."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server.client.local import log_path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path, package: str) -> set[str]:
    """Modules of `server` that a file imports, relative imports resolved, TYPE_CHECKING ones included."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join([*parts, *(node.module.split(".") if node.module else [])])
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in [target, *names] if (ROOT / (n.replace(".", "/") + ".py")).exists()}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith(package)}


def test_no_import_cycles_in_server() -> None:
    graph = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): _imports(p, "server")
        for p in (ROOT / "server").rglob("*.py")
        if p.name != "__init__.py"
    }
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if seen.get(node) == 2:
            return
        if seen.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        seen[node] = 1
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*path, node])
        seen[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_local_servers_log_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMLLM_DATA_DIR", str(tmp_path))
    assert log_path(8123) == tmp_path / "logs" / "serve-8123.log"
    assert log_path(8123, tmp_path / "x") == tmp_path / "x" / "serve-8123.log"
    assert not list(ROOT.glob("serve-*.log")), "server logs committed at the repo root"
