"""Request dependencies: readiness, the API key's owner id, and the session id a request names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from streaming_core.engine_process import RESTARTING

from .conversation.store import ANONYMOUS, owner_id
from .conversation.threads import ThreadStore
from .errors import APIError
from .lifecycle import Lifecycle
from .serving import Serving


def get_lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]


def get_serving(lifecycle: LifecycleDep) -> Serving:
    """The ready server; 503 while starting, after a failed start, and once shutdown has begun."""
    if lifecycle.failed:
        raise APIError(503, f"the server failed to start: {lifecycle.failed}", code="startup_failed")
    if lifecycle.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if lifecycle.serving is None:
        raise APIError(503, "the server is starting (loading the model)", code="not_ready")
    if not lifecycle.serving.engine.available:
        raise APIError(503, "the engine process stopped and is restarting; retry shortly", code=RESTARTING)
    return lifecycle.serving


ServingDep = Annotated[Serving, Depends(get_serving)]


def get_owner(lifecycle: LifecycleDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """Who is asking: sha256 of the Bearer key when keys are configured (never the key itself), else anonymous."""
    if not lifecycle.owners:
        return ANONYMOUS
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    owner = owner_id(key)
    if owner not in lifecycle.owners:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]


def session_id(
    serving: Serving, from_body: str | None, header: str | None, *, param: str = "session_id"
) -> str | None:
    """The session a request names in its body or its X-Session-ID header (both: they must agree)."""
    if from_body is not None and header is not None and from_body != header:
        raise APIError(400, "session_id in the body and the X-Session-ID header differ", param=param)
    sid = from_body if from_body is not None else header
    if sid is not None and not serving.session_id_ok(sid):
        pattern = serving.settings.server.session_id_pattern
        raise APIError(400, f"session_id must match {pattern}", param=param, code="invalid_session_id")
    return sid


SessionHeader = Annotated[str | None, Header(alias="X-Session-ID")]


def get_threads(serving: ServingDep) -> ThreadStore:
    """Threads of the Responses and Conversations APIs, next to the session records (same Redis, TTL)."""
    store = serving.manager.store
    cap = serving.settings.server.conversation_max_items
    return ThreadStore(store.redis, ttl_seconds=store.ttl_seconds, max_items=cap, prefix=store.prefix)


ThreadsDep = Annotated[ThreadStore, Depends(get_threads)]
