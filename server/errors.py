"""Every error leaves the server as OpenAI's body: {"error": {"message", "type", "param", "code"}}.

Malformed or invalid requests are 400 (FastAPI's 422 and its invalid-JSON errors included); 401, 404, 409,
413, 429 and 503 have their own causes; 500 is kept for bugs, answered cleanly by the catch-all handler.
Redis being unreachable or too slow is a 503 with Retry-After (code redis_unavailable), counted in
/metrics, wherever in a request it happens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .conversation.errors import ConversationError
from .redis_client import UNAVAILABLE
from .schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with its HTTP status, in OpenAI's terms."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()


def from_conversation(e: ConversationError) -> APIError:
    return APIError(e.status, e.message, param=e.param, code=e.code, type=e.type)


def redis_unavailable(e: BaseException, retry_after: int) -> APIError:
    return APIError(
        503,
        f"session storage (Redis) is unavailable ({type(e).__name__}: {e}); retry later",
        code="redis_unavailable",
        headers={"Retry-After": str(retry_after)},
    )


def param_path(loc: Sequence[int | str]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content' (OpenAI's `param` style)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = param_path(loc)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        msg = "request body must be a JSON object (sent as Content-Type: application/json)"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return APIError(400, f"{param + ': ' if param else ''}{msg}{more}", param=param, code="invalid_value")


def _json(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return _json(exc, {**headers, **exc.headers})


async def _conversation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConversationError)
    return _json(from_conversation(exc))


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _json(_validation_error(exc))


def _unparsable(cause: BaseException | None) -> str | None:
    """Why a body FastAPI could not parse is not JSON, when json.loads failed with something other than a
    JSONDecodeError (FastAPI turns those into a bare 'There was an error parsing the body')."""
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(cause, ValueError):  # e.g. an integer literal past Python's digit limit
        return str(cause)
    return None


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    reason = _unparsable(exc.__cause__) if exc.status_code == 400 else None
    if reason is not None:
        err = APIError(400, f"request body is not valid JSON: {reason}", code="invalid_json")
    elif exc.status_code == 413:
        err = APIError(413, str(exc.detail), code="body_too_large")
    elif exc.status_code == 404:
        err = APIError(404, f"no route {request.method} {request.url.path}", code="unknown_url")
    elif exc.status_code == 405:
        err = APIError(405, f"method {request.method} not allowed on {request.url.path}")
    else:
        err = APIError(exc.status_code, str(exc.detail))
    return _json(err, dict(exc.headers) if exc.headers else None)


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    lifecycle = request.app.state.lifecycle
    lifecycle.redis_failed("request", exc)
    err = redis_unavailable(exc, lifecycle.settings.redis.retry_after_seconds)
    return _json(err, err.headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json(APIError(500, "internal server error", code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ConversationError, _conversation_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    for error in UNAVAILABLE:
        app.add_exception_handler(error, _redis_unavailable)
    app.add_exception_handler(Exception, _unhandled)
