"""GET /v1/sessions, GET and DELETE /v1/sessions/{id}: the caller's own sessions only (others' are 404)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import OwnerDep, ServingDep, session_id
from ..errors import APIError
from ..schemas import SessionDeleted, SessionList

router = APIRouter(tags=["sessions"])


def _not_found(sid: str) -> APIError:
    return APIError(404, f"no session {sid!r}", param="session_id", code="session_not_found")


@router.get("/sessions")
async def list_sessions(serving: ServingDep, owner: OwnerDep) -> SessionList:
    return SessionList(data=await serving.manager.list(owner))


@router.get("/sessions/{sid}")
async def get_session(sid: str, serving: ServingDep, owner: OwnerDep) -> dict[str, Any]:
    session_id(serving, sid, None)
    info = await serving.manager.get(owner, sid)
    if info is None:
        raise _not_found(sid)
    return {"object": "session", **info}


@router.delete("/sessions/{sid}")
async def delete_session(sid: str, serving: ServingDep, owner: OwnerDep) -> SessionDeleted:
    session_id(serving, sid, None)
    if not await serving.manager.delete(owner, sid):
        raise _not_found(sid)
    return SessionDeleted(id=sid)
