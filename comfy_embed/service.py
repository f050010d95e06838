"""Tasks as the serverless API sees them: run on this instance, persisted to
the shared task log, readable and cancellable from any instance.

No HTTP here: the API package turns :class:`Handle` into responses.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import shutil
import socket
import time
import uuid
from typing import Any, AsyncIterator

import anyio

from .config import Settings
from .errors import (ComfyEmbedError, ExecutionFailed, ImageInputError, NotAccepting,
                     PayloadTooLarge, QueueFull, StorageUnavailable, TaskIdConflict,
                     WebhookRefused, WorkflowInvalid)
from .events import FINAL, coalesce_snapshots, final_event
from .logs import current_task
from .runtime import Engine, Task
from .retention import prune
from .tasklog import TaskLog
from .webhooks import WebhookRequest, Webhooks
from .taskid import check_task_id, valid_task_id

log = logging.getLogger(__name__)

__all__ = ["TaskService", "Handle"]

#: How often a reader of another instance's task looks at the log.
_POLL_SECONDS = 0.2


def _conflict(task_id: str) -> TaskIdConflict:
    return TaskIdConflict(f"task id {task_id} belongs to a task created with another API key")


class Handle:
    """One task as a caller follows it: live on this instance, or read from
    the shared log (another instance runs it, or it is already done)."""

    def __init__(self, service: "TaskService", task_id: str, *, task: Task | None = None,
                 error: ComfyEmbedError | None = None, persisted: anyio.Event | None = None) -> None:
        self.service = service
        self.task_id = task_id
        self.task = task
        #: Set when this request itself failed before queueing.
        self.error = error
        self._persisted = persisted

    async def events(self, since: int = 0) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """``(seq, event)`` after ``since``, ending with the final event, which
        is on disk before it is yielded."""
        if self.task is not None:
            async for seq, ev in self.task.stream(since):
                if ev["type"] == FINAL and self._persisted is not None:
                    await self._persisted.wait()
                yield seq, ev
            return
        tasklog = self.service.tasklog
        while True:
            batch = await anyio.to_thread.run_sync(tasklog.read, self.task_id, since)
            if batch:
                since = batch[-1][0]
            for seq, ev in coalesce_snapshots(batch):
                yield seq, ev
                if ev["type"] == FINAL:
                    return
            if not batch and not await anyio.to_thread.run_sync(tasklog.exists, self.task_id):
                return
            await anyio.sleep(_POLL_SECONDS)

    async def final(self) -> dict[str, Any]:
        """The final event (waiting for it)."""
        last: dict[str, Any] = {}
        async for _, ev in self.events():
            last = ev
        return last


class TaskService:
    """Runs tasks on the engine and mirrors every event into the task log."""

    def __init__(self, engine: Engine, settings: Settings, tasklog: TaskLog | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tasklog = tasklog or TaskLog(settings.task_log_path, self.instance_id,
                                          settings.lease_seconds)
        self._running: dict[str, Task] = {}
        self._writers: set[asyncio.Task[Any]] = set()
        #: Events of each running task already in the log (for flush()).
        self._written: dict[str, int] = {}
        self.webhooks = Webhooks(settings, self.tasklog)
        #: While positive, persisters write at once instead of gathering.
        self._hurry = 0

    # ------------------------------------------------------------- running
    async def start(self, body: Any, *, task_id: str | None = None,
                    webhook: WebhookRequest | None = None, owner_key: str | None = None,
                    **options: Any) -> Handle:
        """Start a task, or attach to it if this task id exists already (a
        retry: it never runs twice). Errors before queueing come back in
        ``Handle.error``; a refused request leaves nothing in the log (unless
        it has a webhook, whose delivery state lives there), an internal
        failure leaves a final event. ``webhook``: where to deliver its end
        (refused URL: WebhookRefused, before anything exists). ``owner_key``
        (the hash of the caller's API key, when keys are configured) is
        recorded with a new task and must match to attach to an existing one.
        ``options`` are :meth:`Engine.submit`'s (output flags, credentials)."""
        task_id = task_id or uuid.uuid4().hex
        try:
            check_task_id(task_id)
        except WorkflowInvalid as e:
            return Handle(self, task_id, error=e)
        # The rest of this request (and the log writer it starts) works for
        # this task: its log records say so.
        current_task.set(task_id)
        live = self._running.get(task_id) or self.engine.get(task_id)
        if live is not None:
            if not await self.may_access(task_id, owner_key):
                return Handle(self, task_id, error=_conflict(task_id))
            return Handle(self, task_id, task=live, persisted=getattr(live, "persisted", None))
        if not self.engine.accepting:
            return Handle(self, task_id, error=NotAccepting(
                "this instance is draining and accepts no new work"))
        if webhook is not None:
            try:
                await self.webhooks.check(webhook)
            except WebhookRefused as e:
                return Handle(self, task_id, error=e)
        try:
            claimed = await anyio.to_thread.run_sync(self._claim, task_id, owner_key)
        except FileExistsError as e:
            return Handle(self, task_id, error=TaskIdConflict(f"task id {task_id}: {e}; "
                                                              "choose another task id"))
        except OSError as e:
            log.warning("task %s: task log unusable: %s", task_id, e)
            return Handle(self, task_id, error=StorageUnavailable(
                f"the task log folder is not writable ({e.strerror or e}); retry later"))
        if not claimed:  # known task: answer from the log
            if not await self.may_access(task_id, owner_key):
                return Handle(self, task_id, error=_conflict(task_id))
            return Handle(self, task_id)
        try:
            task = await self.engine.submit(body, task_id=task_id, **options)
        except (QueueFull, NotAccepting) as e:
            # Not accepted: forget the claim so that a retry can run it.
            await anyio.to_thread.run_sync(self._discard, task_id)
            return Handle(self, task_id, error=e)
        except (WorkflowInvalid, ImageInputError, PayloadTooLarge) as e:
            if webhook is None:
                # Refused, not run: nothing is left on disk (one folder per
                # bad request would pile up) and a corrected retry can run.
                await anyio.to_thread.run_sync(self._discard, task_id)
                return Handle(self, task_id, error=e)
            # With a webhook: its delivery state lives in the task's folder.
            await self.webhooks.register(task_id, webhook)
            await anyio.to_thread.run_sync(
                self.tasklog.append, task_id, final_event(task_id, None, {}, error=e.to_dict()))
            await anyio.to_thread.run_sync(self.tasklog.release, task_id)
            self.webhooks.finished(task_id)
            return Handle(self, task_id, error=e)
        except Exception as e:
            if not isinstance(e, ComfyEmbedError):
                log.exception("task %s: submitting failed", task_id)
                e = ExecutionFailed(f"internal error while accepting the task: {e!r}")
            # Claimed, so the log must end with a final event all the same.
            if webhook is not None:
                await self.webhooks.register(task_id, webhook)
            try:
                await anyio.to_thread.run_sync(
                    self.tasklog.append, task_id,
                    final_event(task_id, None, {}, error=e.to_dict()))
                await anyio.to_thread.run_sync(self.tasklog.release, task_id)
            except OSError as oe:
                log.warning("task %s: cannot write its final event: %s", task_id, oe)
            self.webhooks.finished(task_id)
            return Handle(self, task_id, error=e)
        if webhook is not None:
            await self.webhooks.register(task_id, webhook)
            self.webhooks.follow(task)
        persisted = anyio.Event()
        task.persisted = persisted  # type: ignore[attr-defined]
        self._running[task_id] = task
        writer = asyncio.get_running_loop().create_task(self._persist(task, persisted))
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)
        return Handle(self, task_id, task=task, persisted=persisted)

    async def _persist(self, task: Task, persisted: anyio.Event) -> None:
        """Write the task's events to the log: one file per flush, at most
        every ``task_log_flush_seconds`` while it runs, and the final event
        (with what precedes it) as soon as it exists. Only the final event
        is fsynced; the answer waits for it (``persisted``)."""
        interval = self.settings.task_log_flush_seconds
        written = 0
        last_flush = anyio.current_time()
        try:
            while True:
                while task.last_seq == written and task.final is None:
                    await task.changed()
                if task.final is None:
                    # Gather what comes in the rest of the interval into one file.
                    with anyio.move_on_after(last_flush + interval - anyio.current_time()):
                        while task.final is None and not self._hurry:
                            await task.changed()
                batch = task.events_since(written)
                written = task.last_seq
                if batch:
                    started = time.perf_counter()
                    await anyio.to_thread.run_sync(self.tasklog.extend, task.task_id, batch)
                    self.engine.metrics.task_log_write.observe(time.perf_counter() - started)
                self._written[task.task_id] = written
                last_flush = anyio.current_time()
                if batch and batch[-1][1]["type"] == FINAL:
                    self.webhooks.finished(task.task_id)
                    return
        except Exception:
            log.exception("task %s: writing its log failed", task.task_id)
        finally:
            self._running.pop(task.task_id, None)
            self._written.pop(task.task_id, None)
            persisted.set()
            try:
                await anyio.to_thread.run_sync(self._released, task.task_id)
            except Exception:
                log.exception("task %s: releasing its lease failed", task.task_id)

    def _released(self, task_id: str) -> None:
        self.tasklog.release(task_id)
        usage = self.tasklog.usage(task_id)
        log.info("task %s: task log %d files, %d bytes", task_id, usage.files, usage.bytes)

    def _claim(self, task_id: str, owner_key: str | None) -> bool:
        known = self.tasklog.exists(task_id)
        if (self.settings.output_path / task_id).exists() and not known:
            # A folder the service did not make: never share it (retention
            # deletes a finished task's output folder).
            raise FileExistsError(f"the output folder already has a folder named {task_id}")
        try:
            if not self.tasklog.claim(task_id):
                return False
            if owner_key is not None:
                self.tasklog.set_key_hash(task_id, owner_key)
        except OSError:
            if not known:  # a full disk can take the folder but not its files
                shutil.rmtree(self.tasklog.root / task_id, ignore_errors=True)
            raise
        return True

    def _discard(self, task_id: str) -> None:
        try:
            self.tasklog.discard(task_id)
        except OSError as e:
            log.warning("task %s: cannot remove its refused claim: %s", task_id, e)

    async def may_access(self, task_id: str, owner_key: str | None) -> bool:
        """With API keys on (``owner_key`` given), whether the task was
        created with that key; always True with keys off."""
        if owner_key is None:
            return True
        recorded = await anyio.to_thread.run_sync(self.tasklog.key_hash, task_id)
        return recorded is not None and hmac.compare_digest(recorded, owner_key)

    def handle(self, task_id: str) -> Handle:
        """Follow an existing task (live here, or through the log)."""
        live = self._running.get(task_id)
        if live is not None:
            return Handle(self, task_id, task=live, persisted=getattr(live, "persisted", None))
        return Handle(self, task_id)

    async def read(self, task_id: str, since: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """The task's events after ``since``, with only the latest
        ``progress_state`` (each lists every node): an answer grows with what
        changed since ``since``, not with the number of nodes squared.

        A task running here is answered from memory (fresher than the log,
        same numbers), its final event only once it is on disk.
        """
        if not valid_task_id(task_id):
            return []
        live = self._running.get(task_id)
        if live is not None:
            events = live.events_since(since)
            persisted = getattr(live, "persisted", None)
            if events and events[-1][1]["type"] == FINAL and not (persisted and persisted.is_set()):
                events.pop()
            return coalesce_snapshots(events)
        events = await anyio.to_thread.run_sync(self.tasklog.read, task_id, since)
        return coalesce_snapshots(events)

    async def cancel(self, task_id: str) -> str:
        """'cancelling', 'requested' (another instance owns it), 'done' or
        'unknown'."""
        if not valid_task_id(task_id):
            return "unknown"
        if task_id in self._running:
            return "cancelling" if self.engine.cancel(task_id) else "done"
        if await anyio.to_thread.run_sync(self.tasklog.is_final, task_id):
            return "done"
        if await anyio.to_thread.run_sync(self.tasklog.request_cancel, task_id):
            return "requested"
        return "unknown"

    # ------------------------------------------------------------ upkeep
    async def upkeep(self) -> None:
        """Forever: renew leases of running tasks, act on cancel requests
        from other instances (within a second), and close orphaned tasks."""
        last_recover = last_prune = 0.0
        while True:
            running = list(self._running)
            if running:
                await anyio.to_thread.run_sync(self.tasklog.renew, running)
                for task_id in running:
                    if await anyio.to_thread.run_sync(self.tasklog.cancel_requested, task_id):
                        self.engine.cancel(task_id)
            now = time.monotonic()
            if now - last_recover > self.settings.lease_seconds / 2:
                last_recover = now
                await self.recover()
                await self.webhooks.resume_pending()
            hours = self.settings.retention_hours
            # Hourly-scale retention is checked every minute; a short one
            # (tests, scratch deployments) often enough to be honoured.
            if hours and now - last_prune > min(60.0, max(1.0, hours * 900)):
                last_prune = now
                await self._prune()
            await anyio.sleep(0.5)

    async def _prune(self) -> None:
        s = self.settings
        hours = s.retention_hours
        assert hours is not None
        try:
            await anyio.to_thread.run_sync(
                lambda: prune(s.output_path, s.temp_path, self.tasklog, hours * 3600,
                              input_dir=s.input_path))
        except Exception:
            log.exception("retention: pruning failed")

    async def recover(self) -> list[str]:
        """Give a final event to tasks whose owner died (lease expired)."""
        try:
            ids = await anyio.to_thread.run_sync(self.tasklog.recover_orphans)
        except OSError as e:  # a full or read-only disk: one line, retried later
            log.warning("recovering orphaned tasks failed: %s", e)
            return []
        except Exception:
            log.exception("recovering orphaned tasks failed")
            return []
        for task_id in ids:
            log.warning("task %s: owner lost, closed with an error event", task_id)
        return ids

    async def flush(self) -> None:
        """Wait until every event published so far is in the log; running
        tasks go on (Function Compute's pre-freeze: nothing may be lost
        while the instance is frozen)."""
        due = {task_id: task.last_seq for task_id, task in self._running.items()}
        self._hurry += 1
        try:
            for task in list(self._running.values()):
                task.wake()  # a persister gathering a batch writes it now
            while any(task_id in self._running and self._written.get(task_id, 0) < n
                      for task_id, n in due.items()):
                await anyio.sleep(0.01)
        finally:
            self._hurry -= 1

    async def shutdown(self, grace: float) -> list[str]:
        """SIGTERM/SIGINT: accept nothing, give running work ``grace`` seconds,
        then cancel what is left and make sure each of those tasks has a
        final event in the log. Returns the ids that had to be cancelled."""
        self.engine.accepting = False
        with anyio.move_on_after(grace):
            await self.drain()
        left = list(self._running)
        if not left:
            return []
        log.warning("shutdown: %d task(s) still running after %.0fs: cancelling %s",
                    len(left), grace, ", ".join(left[:10]))
        for task_id in left:
            self.engine.cancel(task_id, "shutdown")
        with anyio.move_on_after(10):  # interrupted nodes stop within a step
            while self._running or self._writers:
                await anyio.sleep(0.05)
        for task_id in left:  # a node that ignores interrupts, or a failed write
            try:
                if not await anyio.to_thread.run_sync(self.tasklog.is_final, task_id):
                    error = NotAccepting("the instance shut down before the task finished")
                    await anyio.to_thread.run_sync(
                        self.tasklog.append, task_id,
                        final_event(task_id, None, {}, error=error.to_dict()))
                    await anyio.to_thread.run_sync(self.tasklog.release, task_id)
            except OSError as e:
                log.error("shutdown: task %s has no final event (log unwritable: %s)", task_id, e)
        return left

    async def drain(self) -> None:
        """Stop accepting, then wait for running work and log writes."""
        self.engine.accepting = False
        while self._running or self._writers or not self.engine.executor.idle:
            await anyio.sleep(0.05)
        await self.webhooks.drain()
