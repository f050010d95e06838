"""GET /api/v2/jobs/{id}/events: the job's live state as Server-Sent Events
(``status``, ``progress``, ``output``, ``log``), the current snapshot first.

Not a replayable log (the spec's events carry no ``id``): on connect, on
any instance, the job's current view is sent (its ``status``, latest
``progress`` and the outputs committed so far), then what changes, read from
the task's events (memory here, or the shared task log); the stream ends
after the terminal ``status``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from comfy_embed import events
from comfy_embed.api.auth import key_hash_of
from comfy_embed.api.v2.errors import not_found
from comfy_embed.api.v2.jobs import base_url, jobs_of, output_json
from comfy_embed.service.jobs import JobService, JobView
from comfy_embed.service.jobview import job_state

__all__ = ["job_events"]


#: Event types of which only the latest counts for the view.
_SNAPSHOTS = frozenset({"progress", "progress_state"})


def _frame(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {events.dumps(data)}\n\n"


def _kept(seen: list[tuple[int, dict[str, Any]]], pair: tuple[int, dict[str, Any]]
          ) -> list[tuple[int, dict[str, Any]]]:
    """The events the job's view needs, with ``pair``: a snapshot (``progress``,
    ``progress_state``) replaces the one before it, so a long run's stream
    does not fold every step again on each event."""
    kind = pair[1].get("type")
    if kind in _SNAPSHOTS:
        seen = [p for p in seen if p[1].get("type") != kind]
    seen.append(pair)
    return seen


async def job_events(request: Request) -> Response:
    """GET /jobs/{id}/events: the SSE stream (404 before it starts)."""
    jobs = jobs_of(request)
    job_id = request.path_params["id"]
    view = await jobs.get(job_id, key_hash_of(request.scope))
    if view is None:
        return not_found()
    keepalive = jobs.tasks.settings.server.sse_keepalive
    folders = request.app.state.v2_folders
    return StreamingResponse(_stream(jobs, view, base_url(request), folders, keepalive),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(jobs: JobService, view: JobView, base: str, folders: dict[str, Any],
                  keepalive: float) -> AsyncIterator[str]:
    job_id = view.job_id
    canceling = view.state.status == "canceling"
    seen = list(await jobs.tasks.read(job_id))
    st = job_state(seen, view.record, cancel_requested=canceling) if seen else view.state
    sent_outputs: set[str] = set()
    status = _frame("status", {"status": st.status, "queue_position": st.queue_position})
    if not st.terminal:
        yield status
    if st.progress is not None:
        yield _frame("progress", st.progress)
    for ref in st.outputs:
        sent_outputs.add(ref.asset_id(job_id))
        yield _frame("output", output_json(ref, job_id, base, folders))
    if st.terminal:  # the stream ends with the terminal status
        yield status
        return
    last = (st.status, st.queue_position, st.progress)
    handle = jobs.tasks.handle(job_id)
    it = handle.events(seen[-1][0] if seen else 0).__aiter__()
    pending: asyncio.Future[tuple[int, dict[str, Any]]] | None = None
    asked = time.monotonic()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                yield ": keepalive\n\n"
                continue
            try:
                pair = pending.result()
            except StopAsyncIteration:
                pair = None
            pending = None
            if pair is not None:
                seen = _kept(seen, pair)
                kind = pair[1].get("type")
                if kind == "execution_error":
                    data = pair[1].get("data") or {}
                    yield _frame("log", {"level": "error",
                                         "message": str(data.get("exception_message", ""))[:2000]})
            canceling = canceling or jobs.cancel_pending(job_id)
            if not canceling and handle.task is None and time.monotonic() - asked > 1.0:
                # Run elsewhere: a cancel asked on any instance is a file in its log.
                asked = time.monotonic()
                canceling = await anyio.to_thread.run_sync(
                    jobs.tasks.tasklog.cancel_requested, job_id)
            now = job_state(seen, view.record, cancel_requested=canceling)
            if pair is None and not now.terminal:
                now = (await jobs.get(job_id, None) or view).state  # read the log's last word
            for ref in now.outputs:
                asset_id = ref.asset_id(job_id)
                if asset_id not in sent_outputs:
                    sent_outputs.add(asset_id)
                    yield _frame("output", output_json(ref, job_id, base, folders))
            if now.progress is not None and now.progress != last[2]:
                yield _frame("progress", now.progress)
            if (now.status, now.queue_position) != last[:2]:
                yield _frame("status", {"status": now.status, "queue_position": now.queue_position})
            last = (now.status, now.queue_position, now.progress)
            if now.terminal or pair is None:
                return
    finally:
        if pending is not None:
            pending.cancel()
