"""The `streamllm` console command: the engine's commands plus the server's.

The server depends on the engine, never the reverse, so the top-level command lives here and hands the
engine's parser machinery (streaming_core/cli.py) the full list of command modules.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from streaming_core import cli as core_cli

SERVER_COMMANDS: list[str] = [
    "server.cli_serve",
    "server.client.chat",
    "server.client.bench_multiturn",
    "server.client.bench_endless",
    "server.client.bench_serve",
    "server.client.bench_http",
    "server.client.bench_sessions",
    "server.client.soak.command",
]


def commands() -> list[str]:
    """Every command module, the engine's first (read at call time, so tests can patch either list)."""
    return [*core_cli.COMMANDS, *SERVER_COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    return core_cli.build_parser(commands())


def main(argv: Sequence[str] | None = None) -> int:
    return core_cli.main(argv, commands())


if __name__ == "__main__":
    raise SystemExit(main())
