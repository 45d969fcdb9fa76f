"""The engine package stands alone: nothing in streaming_core imports the server, by statement or by name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import streaming_core

PACKAGE = Path(streaming_core.__file__).resolve().parent
SERVER = PACKAGE.parent / "server"


def server_modules() -> set[str]:
    """Dotted names of every server module and package ('server', 'server.app', ...)."""
    names = {"server"}
    for path in SERVER.rglob("*.py"):
        parts = path.relative_to(SERVER.parent).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def references(tree: ast.AST) -> list[tuple[int, str]]:
    """Absolute imports, and string constants that look like module paths (importlib by name)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
            found.append((node.lineno, node.value))
    return found


def test_no_module_of_streaming_core_names_the_server() -> None:
    servers = server_modules()
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in references(ast.parse(path.read_text(), str(path)))
        if name in servers or name.startswith("server.")
    ]
    assert not offenders, "streaming_core must not depend on server:\n" + "\n".join(offenders)


def test_the_checker_sees_an_import_by_name() -> None:
    """The walk above catches the pattern it exists for (the old CLI imported server.* by string)."""
    tree = ast.parse('import importlib\nCOMMANDS = ["server.cli_serve"]\nfrom server import app\n')
    names = {name for _, name in references(tree)}
    assert {"server.cli_serve", "server"} <= names


def test_core_cli_loads_no_server_module() -> None:
    code = (
        "import sys; from streaming_core import cli; cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m == 'server' or m.startswith('server.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
