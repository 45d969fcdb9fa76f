"""The Conversations API: a conversation is a thread (conversation/threads.py) whose items its responses
continue; POST /v1/responses with `conversation` runs on its session."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..conversation.threads import Item, Thread, ThreadStore, thread_conflict
from ..deps import OwnerDep, ServingDep, ThreadsDep
from ..response_plan import ResponsePlanner, not_found
from ..schemas_responses import (
    AddItemsRequest,
    CreateConversationRequest,
    UpdateConversationRequest,
    item_page,
    new_id,
)
from .responses import Limit, Order

router = APIRouter(tags=["conversations"])


def _resource(thread: Thread) -> dict[str, Any]:
    return {
        "id": thread.id,
        "object": "conversation",
        "metadata": thread.metadata,
        "created_at": thread.created_at,
    }


async def _conversation(threads: ThreadStore, owner: str, conversation_id: str) -> Thread:
    thread = await threads.get(owner, conversation_id)
    if thread is None or thread.kind != "conversation":
        raise not_found("conversation", conversation_id, "conversation_id")
    return thread


async def _item(threads: ThreadStore, thread: Thread, item_id: str) -> tuple[list[Item], int]:
    items = await threads.items(thread.id)
    for i, item in enumerate(items):
        if item["id"] == item_id:
            return items, i
    raise not_found("item", item_id, "item_id")


@router.post("/conversations")
async def create_conversation(
    body: CreateConversationRequest, owner: OwnerDep, threads: ThreadsDep
) -> dict[str, Any]:
    thread = Thread(new_id("conv"), owner, kind="conversation", metadata=body.metadata or {})
    await threads.write(thread, body.items or [], new=True)
    return _resource(thread)


@router.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, owner: OwnerDep, threads: ThreadsDep) -> dict[str, Any]:
    return _resource(await _conversation(threads, owner, conversation_id))


@router.post("/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str, body: UpdateConversationRequest, owner: OwnerDep, threads: ThreadsDep
) -> dict[str, Any]:
    thread = await _conversation(threads, owner, conversation_id)
    thread.metadata = body.metadata
    if not await threads.write(thread):
        raise thread_conflict(thread.id)
    return _resource(thread)


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(
    conversation_id: str, owner: OwnerDep, serving: ServingDep, threads: ThreadsDep
) -> dict[str, Any]:
    thread = await _conversation(threads, owner, conversation_id)
    await threads.delete(thread.id)
    if thread.session:
        await ResponsePlanner(serving, threads).drop_session(owner, thread.session)
    return {"id": thread.id, "object": "conversation.deleted", "deleted": True}


@router.get("/conversations/{conversation_id}/items")
async def list_items(
    conversation_id: str,
    owner: OwnerDep,
    threads: ThreadsDep,
    limit: Limit = 20,
    order: Order = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    thread = await _conversation(threads, owner, conversation_id)
    return item_page(await threads.items(thread.id), limit, order, after)


@router.post("/conversations/{conversation_id}/items")
async def add_items(
    conversation_id: str, body: AddItemsRequest, owner: OwnerDep, threads: ThreadsDep
) -> dict[str, Any]:
    """Items added here are pending: the conversation's next response prefills them before its input."""
    thread = await _conversation(threads, owner, conversation_id)
    if not await threads.write(thread, body.items):
        raise thread_conflict(thread.id)
    return item_page(body.items, len(body.items), "asc", None)


@router.get("/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, owner: OwnerDep, threads: ThreadsDep) -> Item:
    thread = await _conversation(threads, owner, conversation_id)
    items, i = await _item(threads, thread, item_id)
    return items[i]


@router.delete("/conversations/{conversation_id}/items/{item_id}")
async def delete_item(
    conversation_id: str, item_id: str, owner: OwnerDep, serving: ServingDep, threads: ThreadsDep
) -> dict[str, Any]:
    """Deleting an item the session already holds retires the session: the next response prefills the
    conversation's remaining items on a new one (never a KV that still holds the deleted item)."""
    thread = await _conversation(threads, owner, conversation_id)
    items, i = await _item(threads, thread, item_id)
    ids = [item["id"] for item in items]
    retired = thread.session if thread.committed in ids and i <= ids.index(thread.committed) else ""
    if retired:
        thread.session, thread.committed = "", ""
    if not await threads.remove_item(thread, items[i]):
        raise thread_conflict(thread.id)
    if retired:
        await ResponsePlanner(serving, threads).drop_session(owner, retired)
    return _resource(thread)
