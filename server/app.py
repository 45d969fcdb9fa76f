"""The app factory: builds the FastAPI app and nothing else (startup and shutdown live in lifecycle.py).

uvicorn --factory server.app:create_app      # or: streamllm serve
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI

from streaming_core.engine_api import EngineAPI

from .body_limit import BodyLimit
from .deps import get_owner
from .errors import install_error_handlers
from .lifecycle import Lifecycle
from .routes import chat, completions, conversations, models, ops, responses, sessions, web
from .settings import Settings


def create_app(settings: Settings | None = None, engine: EngineAPI | None = None) -> FastAPI:
    """An app serving `settings` (default: from the environment); `engine` skips loading a model.

    The app owns the engine loop either way: it starts it when ready and stops it on shutdown.
    """
    settings = settings or Settings()
    lifecycle = Lifecycle(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.start()
        try:
            yield
        finally:
            await lifecycle.stop()

    app = FastAPI(
        title="streamllm",
        summary="OpenAI-compatible chat with persistent attention-sink + sliding-window KV sessions",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.server.max_body_bytes)
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    api = APIRouter(prefix="/v1", dependencies=[Depends(get_owner)])
    for module in (chat, completions, models, sessions, responses, conversations):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(ops.router)
    app.include_router(web.router)
    app.mount("/web", web.static_files(), name="web")
    return app
