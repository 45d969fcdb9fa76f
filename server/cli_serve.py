"""`streamllm serve`: run the API server under uvicorn (embedded model and Redis unless configured)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from .lifecycle import Lifecycle

GROUP = None


class GracefulServer(uvicorn.Server):
    """uvicorn that drains the app before closing connections, and exits when the app fails to start.

    Plain uvicorn waits for open streams to end before it runs the lifespan shutdown, which is too late
    for the app to end them cleanly; here shutdown stops accepting, drains (in-flight turns finish within
    the grace period, the rest end with an error event), then lets uvicorn close what is left.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.exit_code = 0

    async def on_tick(self, counter: int) -> bool:
        if self.lifecycle.failed:
            self.exit_code = 1
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        await self.lifecycle.drain()
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str, port: int, **config: Any) -> GracefulServer:
    """A GracefulServer for `app` (uvicorn.Config keyword arguments in `config`)."""
    # asyncio's loop (asyncio.run in `run`) and h11, even where uvloop and httptools are installed: with
    # them one stream got 56-59 tok/s against 63-68, 16 streams 243 against 253-259 (two interleaved rounds
    # on a 2-core box, docs/perf-notes.md); the engine thread and the loop share the GIL either way
    config = {"http": "h11", **config}
    uv = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5, **config)
    return GracefulServer(uv, app.state.lifecycle)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /v1/sessions, /health, /metrics.",
    )
    p.add_argument(
        "--config", type=Path, help="YAML settings file (default: STREAMLLM_CONFIG, else built-ins)"
    )
    p.add_argument("--host", help="interface to bind (default: settings, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default: settings, 8000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .app import create_app
    from .settings import Settings

    overrides = {
        k: v for k, v in (("config", args.config), ("host", args.host), ("port", args.port)) if v is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    server = make_server(app, settings.host, settings.port, log_level=args.log_level)
    asyncio.run(server.serve())
    return server.exit_code
