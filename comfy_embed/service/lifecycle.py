"""Tasks as the serverless API sees them: run on this instance, persisted to
the shared task log, readable and cancellable from any instance.

No HTTP here: the API package turns :class:`Handle` into responses, and
the errors raised here (the ComfyEmbedError hierarchy) into statuses.

The engine owns each task from submit to final event (see
:mod:`comfy_embed.runtime`); the service is one of its observers: for each
task it claimed in the log it starts a writer (in the engine's task group)
that mirrors the events to disk and sets ``Task.final_written``.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import os
import shutil
import socket
import time
import uuid
from typing import Any, AsyncIterator

import anyio
import anyio.lowlevel

from comfy_embed.config import Settings
from comfy_embed.errors import (
    ComfyEmbedError,
    ExecutionFailed,
    NotAccepting,
    StorageUnavailable,
    TaskIdConflict,
)
from comfy_embed.eta import load_prior
from comfy_embed.events import FINAL, coalesce_snapshots, final_event
from comfy_embed.observe.folders import FolderProbe
from comfy_embed.observe.logs import current_task
from comfy_embed.prepare.options import DEFAULT_OPTIONS, RunOptions
from comfy_embed.runtime import Engine, Task, TaskObserver
from comfy_embed.service.attempts import Attempts
from comfy_embed.service.blocking import BlockingCalls
from comfy_embed.service.claim import Claim
from comfy_embed.service.persist import LogWriters
from comfy_embed.service.retention import Retention
from comfy_embed.storage import Credentials
from comfy_embed.taskid import check_task_id, valid_task_id
from comfy_embed.tasklog.attempts import is_lost
from comfy_embed.tasklog.expiry import Policy
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.webhooks.delivery import Webhooks
from comfy_embed.webhooks.request import WebhookRequest

log = logging.getLogger(__name__)

__all__ = ["TaskService", "Handle"]

#: How often a reader of another instance's task looks at the log.
_POLL_SECONDS = 0.2


class Handle:
    """One task as a caller follows it: live on this instance, or read from
    the shared log (another instance runs it, or it is already done)."""

    def __init__(self, service: "TaskService", task_id: str, *, task: Task | None = None) -> None:
        self.service = service
        self.task_id = task_id
        #: The task, while it is live on this instance (None: read the log).
        self.task = task

    async def events(self, since: int = 0) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """``(seq, event)`` after ``since``, ending with the final event, which
        is in the task log before it is yielded."""
        if self.task is not None:
            async for seq, ev in self.task.stream(since):
                if ev["type"] == FINAL:
                    await self.task.final_written.wait()
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
            # A poll, not an event: another instance writes this task's log on
            # a shared folder (NAS, object-storage mount), which tells no one.
            await anyio.sleep(_POLL_SECONDS)

    async def final(self) -> dict[str, Any]:
        """The final event (waiting for it), in the task log when it is returned."""
        if self.task is not None:  # live here: no need to wake for every event
            final = await self.task.wait()
            await self.task.final_written.wait()
            return final
        last: dict[str, Any] = {}
        async for _, ev in self.events():
            last = ev
        return last


class TaskService(TaskObserver):
    """Runs tasks on the engine and mirrors every event into the task log.

    It observes the engine (:meth:`task_accepted`) until :meth:`close`.
    """

    def __init__(self, engine: Engine, settings: Settings, tasklog: TaskLog | None = None) -> None:
        self.engine = engine
        self.settings = settings
        # Resolved once: resolving costs a stat per path component, per claim.
        self._output_path = str(settings.comfy.output_path)
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tasklog = tasklog or TaskLog(settings.task_log_path, self.instance_id,
                                          settings.tasklog.lease_seconds,
                                          output_root=settings.comfy.output_path)
        #: Ids this service claimed in the log and is submitting: its tasks to persist.
        self._claimed: set[str] = set()
        self.webhooks = Webhooks(settings, self.tasklog, engine.background.part("webhooks"))
        #: Whether the task-log and output folders take a file (``/ready``,
        #: and every start while the last verdict was bad).
        self.folders = FolderProbe({"task log": settings.task_log_path,
                                    "output": settings.comfy.output_path})
        #: The claim and the writes of each task's log: on the loop while the
        #: log's disk answers quickly (two thread wake-ups fewer per write).
        self._io = BlockingCalls(settings.tasklog.inline_seconds)
        #: Per-request retention, keep nothing, delete now (issue 29).
        self.retention = Retention(self)
        self.attempts = Attempts(self.tasklog, settings.tasklog.max_attempts)
        #: Each running task's writer of its log (service/persist.py).
        self.writers = LogWriters(
            tasklog=self.tasklog, io=self._io, group=engine.background.part("task log"),
            flush_seconds=settings.tasklog.flush_seconds,
            sync_seconds=settings.tasklog.sync_seconds, metrics=engine.metrics,
            retention=self.retention, attempts=self.attempts, webhooks=self.webhooks,
            folders=self.folders)
        engine.add_observer(self)
        # The ETA's prior: the recent reports of the shared log (a thread, off the loop).
        load_prior(engine.eta.estimator, self.tasklog.root, settings.jobs.eta_history)

    def close(self) -> None:
        """Stop observing the engine and claiming (the server's lifespan ends)."""
        self.engine.remove_observer(self)
        self.tasklog.close()  # its spare folders (a few small removals, at exit)

    # ------------------------------------------------------------- running
    async def start(self, body: Any, options: RunOptions = DEFAULT_OPTIONS, *,
                    task_id: str | None = None, webhook: WebhookRequest | None = None,
                    owner_key: str | None = None, policy: Policy | None = None) -> Handle:
        """Start a task, or attach to it if this task id exists already (a
        retry: it never runs twice).

        A request refused before queueing raises its ComfyEmbedError
        (WorkflowInvalid, TaskIdConflict, NotAccepting, QueueFull,
        StorageUnavailable, ...): a refused request leaves nothing in the log
        (unless it has a webhook, whose delivery state lives there), an
        internal failure leaves a final event. ``webhook``: where to deliver
        its end (refused URL: WebhookRefused, before anything exists).
        ``owner_key`` (the hash of the caller's API key, when keys are
        configured) is recorded with a new task and must match to attach to
        an existing one. ``options``: how the result is delivered;
        ``policy``: its own retention (Retention.policy).
        """
        task_id = task_id or uuid.uuid4().hex
        check_task_id(task_id)
        if owner_key and not options.key:  # fair share: one queue per API key
            options = dataclasses.replace(options, key=owner_key)
        # The rest of this request (and the log writer it starts) works for
        # this task: its log records say so.
        current_task.set(task_id)
        live = await self.engine.lookup(task_id)  # the engine's registry: one for all
        if live is not None and live.done and is_lost(live.final):
            self.engine.forget(task_id)  # lost here (a drain past grace): run it again below
            live = None
        if live is not None:
            await self._check_owner(task_id, owner_key)
            # A finished one whose data was deleted since is answered from the log.
            erased = live.done and await self.retention.erased(task_id)
            return Handle(self, task_id, task=None if erased else live)
        if not self.engine.accepting:
            raise NotAccepting("this instance is draining and accepts no new work")
        await self._check_folders()
        if webhook is not None:
            await self.webhooks.check(webhook)
        claim = Claim(task_id, functools.partial(self._io.run, self._claim, task_id, owner_key),
                      webhook=webhook, webhooks=self.webhooks, claimed_ids=self._claimed)
        policy = self.retention.expect(task_id, policy)  # before the task can end
        outcome = await self._submit_while_claiming(body, options, claim)
        if not (isinstance(outcome, Task) and claim.claimed and claim.error is None):
            self.retention.forget(task_id)  # not run here: refused, known, or closed
            self.attempts.forget(task_id)
        refusal = claim.refusal()
        if refusal is not None:
            raise refusal from claim.error
        if claim.error is not None:
            outcome = claim.error  # unexpected: an internal error, below
        elif not claim.claimed:  # known task: answer from the log
            await self._check_owner(task_id, owner_key)
            return Handle(self, task_id)
        if isinstance(outcome, Task):
            await self.retention.started(task_id, policy)
            return Handle(self, task_id, task=outcome)
        raise await self._not_queued(task_id, outcome, webhook, claim.registered)

    async def _check_folders(self) -> None:
        """StorageUnavailable while the folder probe last found a folder that
        takes no file (``/ready`` or a task that failed writing found it). The
        healthy path reads one attribute; only a bad verdict is checked again
        (at most once per probe interval, off the loop), so recovery is seen."""
        if self.folders.last is None:
            return
        why = await anyio.to_thread.run_sync(self.folders.reason)
        if why:
            raise StorageUnavailable(f"the {why}; retry later")

    async def _submit_while_claiming(self, body: Any, options: RunOptions,
                                     claim: Claim) -> Task | Exception:
        """Submit to the engine while ``claim`` runs: the queued task, or
        what refused it (decided by the caller once the claim is known)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(claim.run)
            # Let it reach its worker thread (or run, on the loop) now: the
            # engine validates small graphs on the loop without yielding, and
            # the claim then runs as soon as the loop waits for it.
            await anyio.lowlevel.checkpoint()
            outcome: Task | Exception
            try:
                outcome = await self.engine.submit(body, options, task_id=claim.task_id,
                                                   before_writes=claim.before_writes)
            except Exception as e:
                outcome = e
            finally:
                self._claimed.discard(claim.task_id)
        return outcome

    async def _check_owner(self, task_id: str, owner_key: str | None) -> None:
        """TaskIdConflict unless the caller may attach to the task (:meth:`may_access`).

        The answer says only that the id is taken, never whose it is: ids are
        one space shared by every key (and by every API dialect), so naming
        the other key would tell a caller which ids other tenants use."""
        if not await self.may_access(task_id, owner_key):
            raise TaskIdConflict(f"task id {task_id} is already in use; choose another task id")

    async def _not_queued(self, task_id: str, failure: Exception,
                          webhook: WebhookRequest | None, registered: bool) -> ComfyEmbedError:
        """This request claimed ``task_id`` but the engine did not queue it:
        the claim undone or closed with a final event; the error to raise."""
        if isinstance(failure, ComfyEmbedError):
            # A refusal (invalid graph or input, queue full, a model that
            # cannot be fetched...): the caller reads it in this very answer,
            # async calls included (202 comes only once queued). Nothing is
            # left on disk (one folder per bad request would pile up), no
            # webhook is sent (a flood of bad requests must not become a
            # flood of outbound POSTs), and a corrected retry can run it.
            self.webhooks.forget(task_id)
            await self._io.run(self._discard, task_id)
            return failure
        log.error("task %s: submitting failed", task_id, exc_info=failure)
        # The log line has the details; the answer and the log say no more.
        error = ExecutionFailed("internal error while accepting the task")
        # Claimed, so the log ends with a final event all the same; a webhook's
        # delivery state lives in the task's folder.
        if webhook is not None and not registered:
            await self.webhooks.register(task_id, webhook)
        await self._close_with_error(task_id, error)
        return error

    def task_accepted(self, task: Task) -> bool:
        """The engine queued ``task``: if this service claimed it, start its
        log writer (and progress webhooks) in the engine's task group."""
        if task.task_id not in self._claimed:
            return False  # not started through this service (a warm-up run)
        self._claimed.discard(task.task_id)
        self.webhooks.follow(task)
        self.writers.start(task)
        return True

    async def refuse(self, task_id: str, error: ComfyEmbedError, owner_key: str | None) -> None:
        """A queued run refused when taken: its final error event (unless the id is taken)."""
        if await self._io.run(self._claim, task_id, owner_key):
            await self._close_with_error(task_id, error)

    async def _close_with_error(self, task_id: str, error: ComfyEmbedError) -> None:
        """A claimed task that will not run: its final error event in the
        log, its lease released, its webhook (if any) on its way."""
        final = final_event(task_id, None, {}, error=error.to_dict())
        self.retention.stamp(task_id, final)
        self.attempts.stamp(task_id, final)
        try:
            await self._io.run(self.tasklog.append, task_id, final)
            await self._io.run(self.tasklog.release, task_id)
        except OSError as e:
            log.error("task %s has no final event (the task log is unwritable: %s)", task_id, e)
        self.webhooks.finished(task_id)

    def _claim(self, task_id: str, owner_key: str | None) -> bool:
        known = self.tasklog.exists(task_id)
        if not known and os.path.lexists(os.path.join(self._output_path, task_id)):
            # A folder the service did not make: never share it (retention
            # deletes a finished task's output folder).
            raise FileExistsError(f"the output folder already has a folder named {task_id}")
        try:
            if not (self.tasklog.claim(task_id) or self.attempts.retry(task_id, owner_key)):
                return False
            self.attempts.claimed(task_id)
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
        """Follow an existing task: live while this service writes its log
        (memory is fresher), else through the log (a finished one's truth)."""
        return Handle(self, task_id, task=self.writers.persisting.get(task_id))

    async def read(self, task_id: str, since: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """The task's events after ``since``, with only the latest
        ``progress_state`` (each lists every node): an answer grows with what
        changed since ``since``, not with the number of nodes squared.

        A task running here is answered from memory (fresher than the log,
        same numbers), its final event only once it is on disk.
        """
        if not valid_task_id(task_id):
            return []
        live = self.writers.persisting.get(task_id)
        if live is not None:
            events = live.events_since(since)
            if events and events[-1][1]["type"] == FINAL and not live.final_written.is_set():
                events.pop()
            return coalesce_snapshots(events)
        events = await anyio.to_thread.run_sync(self.tasklog.read, task_id, since)
        if events and events[-1][1]["type"] == FINAL:  # a final of another writer
            await self.retention.fill(task_id, events[-1][1])
        return coalesce_snapshots(events)

    async def cancel(self, task_id: str) -> str:
        """'cancelling', 'requested' (another instance owns it), 'done' or
        'unknown'."""
        if not valid_task_id(task_id):
            return "unknown"
        if self.engine.get(task_id) is not None:
            return "cancelling" if self.engine.cancel(task_id) else "done"
        if await anyio.to_thread.run_sync(self.tasklog.is_final, task_id):
            return "done"
        if await anyio.to_thread.run_sync(self.tasklog.request_cancel, task_id):
            return "requested"
        return "unknown"

    async def delete(self, task_id: str, owner_key: str | None,
                     credentials: Credentials | None = None) -> dict[str, Any] | None:
        """Delete a task now, leaving a tombstone (Retention.delete): None if
        unknown or another key's; TaskRunning if it would not stop."""
        return await self.retention.delete(task_id, owner_key, credentials)

    # ------------------------------------------------------------ upkeep
    async def upkeep(self) -> None:
        """Forever: renew leases of running tasks, act on cancel requests
        from other instances (within a second), and close orphaned tasks."""
        last_recover = last_prune = 0.0
        while True:
            running = list(self.writers.persisting)
            if running:
                for task_id in await anyio.to_thread.run_sync(self._renew, running):
                    self.engine.cancel(task_id)
            now = time.monotonic()
            if now - last_recover > self.settings.tasklog.lease_seconds / 2:
                last_recover = now
                await self.recover()
                await self.webhooks.resume_pending()
            hours = self.settings.tasklog.retention_hours
            # Hourly-scale retention is checked every minute; a short one
            # (tests, scratch deployments) often enough to be honoured.
            if hours and now - last_prune > min(60.0, max(1.0, hours * 900)):
                last_prune = now
                await self._prune()
            await self.retention.sweep()  # ?ttl= and keep-nothing tasks, on time
            # A timer, not an event: leases are renewed on a clock, and cancel
            # requests and orphans are files other instances write in the
            # shared log, which notifies no one.
            await anyio.sleep(0.5)

    def _renew(self, running: list[str]) -> list[str]:
        """Renew the leases of ``running``; those another instance asked to
        cancel. One worker-thread hop for all (at 16 queued tasks, it was
        17 hops every half second)."""
        self.tasklog.renew(running)
        return [task_id for task_id in running if self.tasklog.cancel_requested(task_id)]

    async def _prune(self) -> None:
        await self.retention.prune()

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
        """Wait until every event published so far is in the log (LogWriters.flush)."""
        await self.writers.flush()

    async def shutdown(self, grace: float) -> list[str]:
        """SIGTERM/SIGINT: accept nothing, give running work ``grace`` seconds,
        then cancel what is left and make sure each of those tasks has a
        final event in the log. Returns the ids that had to be cancelled.
        What is still running in the engine's task group after this is the
        lifespan's to cancel."""
        self.engine.accepting = False
        with anyio.move_on_after(grace):
            await self.drain()
        left = list(self.writers.persisting)
        if not left:
            return []
        log.warning("shutdown: %d task(s) still running after %.0fs: cancelling %s",
                    len(left), grace, ", ".join(left[:10]))
        for task_id in left:
            self.engine.cancel(task_id, "shutdown")
        with anyio.move_on_after(10):  # interrupted nodes stop within a step
            await self.engine.wait_idle()
            # Results still being assembled had their grace: they end with a
            # final event now, which their writers persist.
            self.engine.abandon_results()
            await self.writers.drain()
        for task_id in left:  # a node that ignores interrupts, or a failed write
            try:
                final = await anyio.to_thread.run_sync(self.tasklog.is_final, task_id)
            except OSError as e:
                log.error("shutdown: task %s: cannot read its log: %s", task_id, e)
                continue
            if not final:
                await self._close_with_error(task_id, NotAccepting(
                    "the instance shut down before the task finished"))
        return left

    async def drain(self) -> None:
        """Stop accepting, then wait for running work and log writes."""
        self.engine.accepting = False
        await self.engine.wait_idle()
        await self.writers.drain()
        await self.webhooks.drain()

