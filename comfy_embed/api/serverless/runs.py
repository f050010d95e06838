"""POST /run (sync, stream, async), GET /status, POST /cancel, GET /webhook."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, AsyncIterator, Mapping

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from comfy_embed import events
from comfy_embed.api.apps import app_graph
from comfy_embed.api.auth import key_hash_of
from comfy_embed.api.body import (
    deadline_param,
    flag,
    read_limited,
    task_id_param,
    whole_number,
)
from comfy_embed.api.errors import status_for, status_for_event
from comfy_embed.dryrun import dry_run
from comfy_embed.errors import (
    ComfyEmbedError,
    InvalidParameter,
    NotAccepting,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    StorageUnavailable,
)
from comfy_embed.eta import Forecast, queue_fields
from comfy_embed.events import final_event
from comfy_embed.prepare.options import RunOptions
from comfy_embed.service.lifecycle import Handle, TaskService
from comfy_embed.service.replay import read_replay
from comfy_embed.storage import credentials_from_headers
from comfy_embed.webhooks.request import envelope_webhook, webhook_request

__all__ = ["run", "validate", "status", "cancel", "delete", "webhook", "dumps",
           "error_headers", "run_options", "task_id_from", "since_param", "log_refused"]

log = logging.getLogger(__name__)

#: Where a task id may come from, first present wins. Function Compute sets
#: x-fc-async-task-id on async calls and returns it to the client, so it must
#: win for the client's status query to find the task; x-fc-request-id is set
#: on every FC call, so it comes last.
TASK_ID_HEADERS = ("x-fc-async-task-id", "x-fc-trace-id", "x-task-id", "x-fc-request-id")


def dumps(ev: Any) -> str:
    """Compact JSON text of an event (orjson; see events.dumps_bytes)."""
    return events.dumps(ev)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(events.dumps_bytes(body), status, headers=headers, media_type="application/json")


def error_headers(error: ComfyEmbedError, task_id: str) -> dict[str, str]:
    headers = {"X-Task-Id": task_id}
    if isinstance(error, (QueueFull, NotAccepting, StorageUnavailable, QueueUnavailable)):
        headers["Retry-After"] = str(error.retry_after)
    return headers


def log_refused(what: str, task_id: str, error: ComfyEmbedError) -> None:
    """One line per refused request: no traceback (not a server fault), and
    a bounded message (it may quote the request)."""
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    log.info("refused %s task %s: %d %s: %s", what, task_id[:128], status_for(error),
             error.type, message)


def _error_answer(error: ComfyEmbedError, task_id: str, stream: bool) -> Response:
    log_refused("run", task_id, error)
    final = final_event(task_id, None, {}, error=error.to_dict())
    headers = error_headers(error, task_id)
    if stream:
        return Response(f"data: {dumps(final)}\n\n", status_for(error), headers=headers,
                        media_type="text/event-stream")
    return _json(final, status_for(error), headers)


async def _sse(handle: Handle, since: int, keepalive: float) -> AsyncIterator[str]:
    """SSE lines; after ``keepalive`` seconds of silence (a long queue, a slow
    node) a comment line, so proxies do not close an idle stream."""
    events = handle.events(since).__aiter__()
    pending: asyncio.Future[tuple[int, dict[str, Any]]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            # Wait without cancelling the read: cancelling would break the
            # event iterator.
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                seq, ev = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield f"id: {seq}\ndata: {dumps(ev)}\n\n"
    finally:
        if pending is not None:
            pending.cancel()


def run_options(query: Mapping[str, str], headers: Mapping[str, str]) -> RunOptions:
    """The run's options, from the query string and headers; raises
    InvalidParameter (400) for a malformed one."""
    output_format = (query.get("output_format") or "").lower() or None
    if output_format is not None and len(output_format) > 16:
        raise InvalidParameter("output_format must be one of png, jpeg, webp")
    return RunOptions(output_base64=flag(query.get("output_base64")),
                      output_oss=flag(query.get("output_oss")),
                      output_format=output_format,
                      quality=whole_number("quality", query.get("quality"), low=1, high=100),
                      credentials=credentials_from_headers(headers),
                      variants=whole_number("variants", query.get("variants"), low=1),
                      deadline=deadline_param(query, headers))


def task_id_from(headers: Mapping[str, str]) -> str:
    """The task id a request names (see ``TASK_ID_HEADERS``), else a new uuid4."""
    for name in TASK_ID_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return uuid.uuid4().hex


def since_param(query: Mapping[str, str], headers: Mapping[str, str] | None = None) -> int:
    """Resume point: SSE ``Last-Event-ID`` header, else ``?since=``; 400 if malformed."""
    if headers is not None and headers.get("last-event-id"):
        return whole_number("Last-Event-ID", headers.get("last-event-id"), default=0) or 0
    return whole_number("since", query.get("since"), default=0) or 0


async def run(request: Request) -> Response:
    service: TaskService = request.app.state.service
    settings = service.settings
    q = request.query_params
    task_id = task_id_from(request.headers)
    stream = flag(q.get("stream"))
    try:
        # Every parameter is checked before the body is read or a task starts.
        options = run_options(q, request.headers)
        policy = service.retention.policy(q.get("ttl"), q.get("keep"))
        since = since_param(q, request.headers) if stream else 0
        body = await read_limited(request, settings.server.max_body_bytes)
        app = request.path_params.get("name") or q.get("app")  # POST /api/apps/{name}, ?app=
        replay = None
        if app:
            parsed, envelope_url = app_graph(request.app.state, app, body), None
        elif q.get("replay") is not None:  # a recorded task's graph, run again
            replay = await anyio.to_thread.run_sync(read_replay, service.tasklog, service.engine,
                                                    task_id_param(q.get("replay")))
            parsed, envelope_url = replay.graph, None
        else:
            parsed, envelope_url = envelope_webhook(body)
        hook = webhook_request(q, envelope_url, settings)
        is_async = request.headers.get("x-fc-invocation-type", "").lower() == "async"
        queue = request.app.state.queue
        if queue is not None and is_async and not (settings.server.async_inline or app or replay
                                                   or stream):
            # The durable queue mode: any idle instance of the fleet runs it.
            await queue.put(task_id, str(q), key_hash_of(request.scope), body)
            return _json({"task_id": task_id}, 202, {"X-Task-Id": task_id})
        handle = await service.start(parsed, options, task_id=task_id, webhook=hook,
                                     owner_key=key_hash_of(request.scope), policy=policy)
    except ComfyEmbedError as e:  # refused before queueing: the table says how
        return _error_answer(e, task_id, stream)
    if replay is not None and handle.task is not None:
        handle.task.report.replay = replay.describe()  # into the report's run record
    headers = {"X-Task-Id": task_id}
    if is_async and not settings.server.async_inline:
        # Where it stands: position and ETA (issue 28; None each when not known).
        return _json({"task_id": task_id, **queue_fields(_forecast(handle))}, 202, headers)
    if stream:
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return StreamingResponse(_sse(handle, since, settings.server.sse_keepalive),
                                 media_type="text/event-stream",
                                 headers=headers)
    final = await handle.final()
    if replay is not None and isinstance(final.get("data"), dict):
        final = {**final, "data": {**final["data"], "replay": replay.describe()}}
    error = (final.get("data") or {}).get("error") or {}
    if error.get("type") == StorageUnavailable.type:
        headers["Retry-After"] = str(StorageUnavailable("").retry_after)
    return _json(final, status_for_event(final), headers)


def _forecast(handle: Handle) -> Forecast | None:
    task = handle.task
    return task.forecast() if task is not None and task.forecast is not None else None


async def validate(request: Request) -> Response:
    """The dry run: every check of a run, nothing queued or executed. 200
    with ``{"valid": ...}`` whether or not the workflow is valid."""
    service: TaskService = request.app.state.service
    try:
        body = await read_limited(request, service.settings.server.max_body_bytes)
    except PayloadTooLarge as e:
        return _json({"valid": False, "error": e.to_dict()}, status_for(e))
    try:
        variants = whole_number("variants", request.query_params.get("variants"), low=1)
    except InvalidParameter as e:
        return _json({"valid": False, "error": e.to_dict()}, status_for(e))
    try:
        report = await dry_run(service.engine, body, credentials_from_headers(request.headers),
                               variants)
    except NotAccepting as e:
        return _json({"valid": False, "error": e.to_dict()}, status_for(e),
                     {"Retry-After": str(e.retry_after)})
    return _json(report)


def _param_error(what: str, error: ComfyEmbedError, task_id: str = "") -> Response:
    log_refused(what, task_id, error)
    return _json(final_event(task_id, None, {}, error=error.to_dict()), status_for(error))


async def status(request: Request) -> Response:
    service: TaskService = request.app.state.service
    try:
        task_id = task_id_param(request.query_params.get("task_id"))
        since = since_param(request.query_params)
    except InvalidParameter as e:
        return _param_error("status", e)
    if not await service.may_access(task_id, key_hash_of(request.scope)):
        return _json([])  # another key's task reads as unknown
    found = await service.read(task_id, since)
    # Each event keeps ComfyUI's {"type", "data"} shape; "id" is its sequence
    # number, for ?since= and SSE Last-Event-ID.
    return _json([{**ev, "id": seq} for seq, ev in found])


async def cancel(request: Request) -> Response:
    service: TaskService = request.app.state.service
    try:
        task_id = task_id_param(request.query_params.get("task_id"))
    except InvalidParameter as e:
        return _param_error("cancel", e)
    if not await service.may_access(task_id, key_hash_of(request.scope)):
        outcome = "unknown"  # another key's task: neither cancelled nor revealed
    else:
        outcome = await service.cancel(task_id)
    code = {"cancelling": 200, "requested": 202, "done": 409, "unknown": 404}[outcome]
    return JSONResponse({"task_id": task_id, "status": outcome}, code)


async def delete(request: Request) -> Response:
    """DELETE /task?task_id=: the task's inputs, outputs (and uploads, where
    the operator allows it), webhook state and events deleted now, a running
    one cancelled first; 200 with what was removed, 404 unknown (or another
    key's), 409 still running after its cancel. A tombstone stays: a status
    or a retry then answers 410 ``task_deleted``."""
    service: TaskService = request.app.state.service
    try:
        task_id = task_id_param(request.query_params.get("task_id"))
        outcome = await service.delete(task_id, key_hash_of(request.scope),
                                       credentials_from_headers(request.headers))
    except ComfyEmbedError as e:
        return _param_error("delete", e, request.query_params.get("task_id") or "")
    if outcome is None:
        return _json({"task_id": task_id, "status": "unknown"}, 404)
    return _json(outcome)


async def webhook(request: Request) -> Response:
    """The webhook delivery state of a task (attempts, next try, outcome);
    404 when the task is unknown or has no webhook."""
    service: TaskService = request.app.state.service
    try:
        task_id = task_id_param(request.query_params.get("task_id"))
    except InvalidParameter as e:
        return _param_error("webhook", e)
    state = None
    if await service.may_access(task_id, key_hash_of(request.scope)):
        state = await service.webhooks.status(task_id)
    if state is None:
        return _json({"task_id": task_id, "state": "none"}, 404)
    return _json(state)
