"""The durable queue mode of the FC run (issue 24, ``COMFY_EMBED_REDIS_URL``):
async submissions go to a Redis stream; every instance takes the next entry
when it is idle, runs it under its task id, and acknowledges it once its
final event is in the shared log.

An entry carries the task id, the query string, the caller's key hash and
the body: never headers (they may hold credentials; a queued run uses the
instance's own storage credentials). Its graph is checked when an instance
takes it: a refusal is then the task's final error event. An entry whose
instance died is reclaimed after the lease (XAUTOCLAIM) and its task, closed
as lost, runs again as its next attempt; an instance that shuts down puts
the entry of a task it could not finish back on the stream.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import orjson
from starlette.datastructures import QueryParams

from comfy_embed.api.serverless.runs import run_options
from comfy_embed.errors import ComfyEmbedError, NotAccepting, QueueUnavailable
from comfy_embed.queue import StreamQueue, Work
from comfy_embed.service.lifecycle import TaskService
from comfy_embed.taskid import check_task_id
from comfy_embed.tasklog.attempts import is_lost
from comfy_embed.webhooks.request import envelope_webhook, webhook_request

__all__ = ["TaskQueue"]

log = logging.getLogger(__name__)

#: Seconds one read waits for an entry (also how soon a drain stops reading).
_BLOCK_SECONDS = 1.0


class TaskQueue:
    """The service's side of the stream: :meth:`put` for the API, :meth:`work` as a loop."""

    def __init__(self, service: TaskService, url: str, stream: str) -> None:
        self.service = service
        self.queue = StreamQueue(url, stream, service.instance_id)

    async def reason(self) -> str | None:
        """Why the queue cannot be used now (``/ready``), or None."""
        return await anyio.to_thread.run_sync(self.queue.reason)

    async def put(self, task_id: str, query: str, owner_key: str | None, body: bytes) -> None:
        """Queue an async run; QueueUnavailable (503) if it was not queued."""
        check_task_id(task_id)
        if not self.service.engine.accepting:
            raise NotAccepting("this instance is draining and accepts no new work")
        meta = orjson.dumps({"query": query, "owner_key": owner_key})
        await anyio.to_thread.run_sync(self.queue.put, task_id, meta + b"\n" + body)

    async def work(self, warm: anyio.Event) -> None:
        """Once warm, while this instance accepts work and is idle: take the
        next entry (one left by a dead instance first) and run it to its final."""
        engine = self.service.engine
        lease = self.service.settings.tasklog.lease_seconds
        await warm.wait()
        while engine.accepting:
            await engine.wait_idle()
            try:
                work = (await anyio.to_thread.run_sync(self.queue.reclaim, lease)
                        or await anyio.to_thread.run_sync(self.queue.take, _BLOCK_SECONDS))
            except QueueUnavailable as e:
                log.warning("%s; trying again", e.message)
                # A back-off, not an event: nothing says when Redis is back.
                await anyio.sleep(1.0)
                continue
            if work is not None:
                try:
                    await self._run(work)
                except Exception:  # unacknowledged: reclaimed after the lease
                    log.exception("task %s: running it from the queue failed", work.task_id)

    async def _run(self, work: Work) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep, work)
            final = await self._final(work)
            tg.cancel_scope.cancel()
        try:
            attempt = ((final or {}).get("data") or {}).get("attempt") or 1
            if final is None or (is_lost(final)
                                 and attempt < self.service.settings.tasklog.max_attempts):
                # Lost (this instance's drain, or its lease lapsed under load):
                # back on the stream, where the next taker runs its next attempt.
                await anyio.to_thread.run_sync(self.queue.give_back, work)
            else:
                await anyio.to_thread.run_sync(self.queue.ack, work.entry_id)
        except QueueUnavailable as e:  # reclaimed after the lease instead
            log.warning("task %s: %s", work.task_id, e.message)

    async def _keep(self, work: Work) -> None:
        """While the entry's task runs here: keep it ours (a run may last
        longer than the lease after which entries are reclaimed)."""
        while True:
            # A clock, not an event: the idle time Redis counts is a clock too.
            await anyio.sleep(self.service.settings.tasklog.lease_seconds / 3)
            try:
                await anyio.to_thread.run_sync(self.queue.touch, work.entry_id)
            except QueueUnavailable as e:
                log.warning("task %s: %s", work.task_id, e.message)

    async def _final(self, work: Work) -> dict[str, Any] | None:
        """Run the entry's task (again, when its last attempt was lost) and
        return its final event; None if this instance no longer accepts work."""
        meta, _, body = work.body.partition(b"\n")
        fields = orjson.loads(meta)
        service, task_id = self.service, work.task_id
        final: dict[str, Any] = {}
        for _ in range(2):  # a reclaimed entry: first wait for the dead run's end
            try:
                q = QueryParams(fields["query"])
                parsed, envelope_url = envelope_webhook(body)
                handle = await service.start(
                    parsed, run_options(q, {}), task_id=task_id,
                    webhook=webhook_request(q, envelope_url, service.settings),
                    owner_key=fields["owner_key"],
                    policy=service.retention.policy(q.get("ttl"), q.get("keep")))
            except NotAccepting:
                return None  # draining: the entry goes back for another instance
            except ComfyEmbedError as e:
                await service.refuse(task_id, e, fields["owner_key"])
                return {}
            final = await handle.final()
            if handle.task is not None or not is_lost(final):
                return final
        return final
