"""WebSocket /api/serverless/ws: one workflow per text message, every event
back as a text message, ending with ``serverless_api``; the connection then
takes the next workflow. ``?task_id=&since=`` first replays a task (resume).

A malformed query parameter ends the connection with the final error event
and close code 1008 (policy violation); a bad message gets its final error
event and the connection goes on."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Mapping

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from comfy_embed.api.apps import app_graph
from comfy_embed.api.auth import key_hash_of
from comfy_embed.api.body import deadline_param, task_id_param
from comfy_embed.api.serverless.runs import dumps, log_refused, run_options, since_param
from comfy_embed.errors import (
    ComfyEmbedError,
    InvalidParameter,
    PayloadTooLarge,
    WorkflowInvalid,
)
from comfy_embed.events import final_event
from comfy_embed.prepare.options import RunOptions
from comfy_embed.service.lifecycle import Handle, TaskService
from comfy_embed.tasklog.expiry import Policy
from comfy_embed.webhooks.request import envelope_webhook, webhook_request

__all__ = ["serverless_ws"]

#: RFC 6455 close code for a malformed query parameter.
POLICY_VIOLATION = 1008


async def _relay(ws: WebSocket, handle: Handle, since: int = 0) -> None:
    async for _, ev in handle.events(since):
        await ws.send_text(dumps(ev))


async def _send_error(ws: WebSocket, task_id: str, error: ComfyEmbedError) -> None:
    log_refused("websocket", task_id, error)
    await ws.send_text(dumps(final_event(task_id, None, {}, error=error.to_dict())))


def _message_text(message: Message, limit: int) -> str:
    """The workflow text of one message; WorkflowInvalid when it is not
    UTF-8, PayloadTooLarge over ``limit`` bytes."""
    text = message.get("text")
    if text is None:
        try:
            text = (message.get("bytes") or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise WorkflowInvalid("message is not UTF-8 text", type="invalid_json") from None
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise PayloadTooLarge(f"message is over the limit of {limit} bytes")
    return text


async def _start(service: TaskService, message: Message, query: Mapping[str, Any],
                 options: RunOptions, task_id: str, owner_key: str | None,
                 policy: Policy, state: Any = None) -> Handle:
    """The task of one message; its ComfyEmbedError when refused."""
    text = _message_text(message, service.settings.server.max_body_bytes)
    app = query.get("app")  # ?app=NAME: each message is that app's parameters
    if app:
        parsed, envelope_url = app_graph(state, app, text), None
    else:
        parsed, envelope_url = envelope_webhook(text)
    hook = webhook_request(query, envelope_url, service.settings)
    return await service.start(parsed, options, task_id=task_id, webhook=hook,
                               owner_key=owner_key, policy=policy)


async def serverless_ws(ws: WebSocket) -> None:
    service: TaskService = ws.app.state.service
    q = ws.query_params
    owner_key = key_hash_of(ws.scope)
    await ws.accept()
    try:
        try:
            opts = run_options(q, ws.headers)
            policy = service.retention.policy(q.get("ttl"), q.get("keep"))
            resume = task_id_param(q.get("task_id"), required=False)
            since = since_param(q)
        except InvalidParameter as e:
            await _send_error(ws, q.get("task_id", "")[:128], e)
            await ws.close(POLICY_VIOLATION, "invalid parameter")
            return
        if resume:
            if await service.may_access(resume, owner_key):
                await _relay(ws, service.handle(resume), since)
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            task_id = uuid.uuid4().hex
            if opts.deadline is not None:  # "seconds from now": from each message
                opts = dataclasses.replace(opts, deadline=deadline_param(q, ws.headers))
            try:
                handle = await _start(service, message, q, opts, task_id, owner_key, policy,
                                      ws.app.state)
            except ComfyEmbedError as e:  # this message is refused; the connection goes on
                await _send_error(ws, task_id, e)
                continue
            await _relay(ws, handle)
    except WebSocketDisconnect:
        # The task (if any) goes on; its log still ends with the final event.
        return
