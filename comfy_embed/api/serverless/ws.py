"""WebSocket /api/serverless/ws: one workflow per text message, every event
back as a text message, ending with ``serverless_api``; the connection then
takes the next workflow. ``?task_id=&since=`` first replays a task (resume).

A malformed query parameter ends the connection with the final error event
and close code 1008 (policy violation); a bad message gets its final error
event and the connection goes on."""

from __future__ import annotations

import uuid

from starlette.websockets import WebSocket, WebSocketDisconnect

from comfy_embed.api.auth import key_hash_of
from comfy_embed.api.body import task_id_param
from comfy_embed.api.serverless.runs import dumps, log_refused, run_options, since_param
from comfy_embed.errors import (
    ComfyEmbedError,
    InvalidParameter,
    WebhookRefused,
    WorkflowInvalid,
)
from comfy_embed.events import final_event
from comfy_embed.service.lifecycle import Handle, TaskService
from comfy_embed.webhooks.delivery import envelope_webhook, webhook_request

__all__ = ["serverless_ws"]

#: RFC 6455 close code for a malformed query parameter.
POLICY_VIOLATION = 1008


async def _relay(ws: WebSocket, handle: Handle, since: int = 0) -> None:
    async for _, ev in handle.events(since):
        await ws.send_text(dumps(ev))


async def _send_error(ws: WebSocket, task_id: str, error: ComfyEmbedError) -> None:
    log_refused("websocket", task_id, error)
    await ws.send_text(dumps(final_event(task_id, None, {}, error=error.to_dict())))


async def serverless_ws(ws: WebSocket) -> None:
    service: TaskService = ws.app.state.service
    q = ws.query_params
    owner_key = key_hash_of(ws.scope)
    await ws.accept()
    try:
        try:
            opts = run_options(q, ws.headers)
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
            text = message.get("text")
            if text is None:
                raw = message.get("bytes") or b""
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    await _send_error(ws, uuid.uuid4().hex,
                                      WorkflowInvalid("message is not UTF-8 text", type="invalid_json"))
                    continue
            if len(text) > service.settings.max_body_bytes or \
                    len(text.encode("utf-8", "surrogatepass")) > service.settings.max_body_bytes:
                await _send_error(ws, uuid.uuid4().hex, WorkflowInvalid(
                    f"message is over the limit of {service.settings.max_body_bytes} bytes",
                    type="payload_too_large"))
                continue
            try:
                parsed, envelope_url = envelope_webhook(text)
                hook = webhook_request(q, envelope_url, service.settings)
            except WebhookRefused as e:
                await _send_error(ws, uuid.uuid4().hex, e)
                continue
            handle = await service.start(parsed, opts, task_id=uuid.uuid4().hex, webhook=hook,
                                         owner_key=owner_key)
            if handle.error is not None:
                await _send_error(ws, handle.task_id, handle.error)
                continue
            await _relay(ws, handle)
    except WebSocketDisconnect:
        # The task (if any) goes on; its log still ends with the final event.
        return
