"""Each task's writer: its events mirrored into the shared task log while it
runs (gathered into one file per flush interval), its final event written
before the answer goes (fsynced after it, with the other finals of a short
span: settle.py), its lease released.

Split from :mod:`comfy_embed.service.lifecycle` (the task service starts one
writer per claimed task and reads :attr:`LogWriters.persisting`); FC's
pre-freeze hook waits on :meth:`LogWriters.flush`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from comfy_embed.background import Background
from comfy_embed.errors import StorageUnavailable
from comfy_embed.events import FINAL, error_type
from comfy_embed.observe.folders import FolderProbe
from comfy_embed.observe.metrics import Metrics
from comfy_embed.service.attempts import Attempts
from comfy_embed.service.blocking import BlockingCalls
from comfy_embed.service.replay import (
    EMBED_LIMIT,
    REPLAY_RECORD,
    replay_record,
    write_replay,
)
from comfy_embed.service.retention import Retention
from comfy_embed.service.settle import Settler
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasks import Task
from comfy_embed.webhooks.delivery import Webhooks

log = logging.getLogger(__name__)

__all__ = ["LogWriters"]


class LogWriters:
    """The writers of the tasks this instance runs (one per task, in the
    engine's task group), and what :meth:`flush` needs to know of them."""

    def __init__(self, *, tasklog: TaskLog, io: BlockingCalls, group: Background,
                 flush_seconds: float, metrics: Metrics, retention: Retention,
                 attempts: Attempts, webhooks: Webhooks, folders: FolderProbe,
                 sync_seconds: float = 0.0) -> None:
        self.tasklog = tasklog
        self._io = io
        self.group = group
        self.flush_seconds = flush_seconds
        self.metrics = metrics
        self.retention = retention
        self.attempts = attempts
        self.webhooks = webhooks
        self.folders = folders
        #: Tasks whose log is written here (and whose lease this instance holds).
        self.persisting: dict[str, Task] = {}
        #: Events of each running task already in the log (for flush()).
        self.written: dict[str, int] = {}
        #: Tasks whose writer is retrying because the log refused a write.
        self.failing: set[str] = set()
        #: Set (and replaced) whenever a writer wrote, failed or ended: flush() waits on it.
        self._wrote = anyio.Event()
        #: While positive, writers write at once instead of gathering.
        self.hurry = 0
        #: Fsyncs the finals written before their answers, after them.
        self.settler = Settler(tasklog, group, sync_seconds)

    def start(self, task: Task) -> None:
        """Start ``task``'s writer."""
        self.persisting[task.task_id] = task
        self.group.spawn(self._persist, task, name=f"task log of {task.task_id}")

    async def drain(self) -> None:
        await self.group.drain()

    async def _persist(self, task: Task) -> None:
        """Write the task's events to the log: one file per flush, at most
        every ``task_log_flush_seconds`` while it runs, and the final event
        (with what precedes it) as soon as it exists. Only the final event
        is fsynced; the answer waits for it to be written
        (``task.final_written``), not for the fsync."""
        interval = self.flush_seconds
        written = 0
        last_flush = anyio.current_time()
        #: Seconds until the next try while the log refuses writes (a full disk).
        backoff = 0.0
        released = False
        try:
            while True:
                if not backoff:
                    while task.last_seq == written and task.final is None:
                        await task.changed()
                    if task.final is None:
                        # Gather what comes in the rest of the interval into one file.
                        with anyio.move_on_after(last_flush + interval - anyio.current_time()):
                            while task.final is None and not self.hurry:
                                await task.end_or_wake()
                batch = task.events_since(written)
                upto = task.last_seq
                ends = bool(batch) and batch[-1][1]["type"] == FINAL
                if batch:
                    started = time.perf_counter()
                    try:
                        if ends:
                            released = await self._last_write(task, batch)
                        else:
                            await self._io.run(self.tasklog.extend, task.task_id, batch)
                    except OSError as e:
                        # Keep the events and try again (the lease is still
                        # renewed meanwhile, so nobody closes the task as lost).
                        self.failing.add(task.task_id)
                        self._tell_flush()
                        if not backoff:
                            log.warning("task %s: cannot write its task log (%s); retrying "
                                        "until it can", task.task_id, e)
                        if ends:
                            # The caller gets its answer now; the log catches up.
                            task.final_written.set()
                        backoff = min(5.0, max(0.2, backoff * 2))
                        # A back-off, not a wait for an event: nothing says
                        # when a full or read-only disk takes writes again.
                        await anyio.sleep(backoff)
                        continue
                    if backoff:
                        log.info("task %s: task log writable again", task.task_id)
                        self.failing.discard(task.task_id)
                        backoff = 0.0
                    self.metrics.task_log_write.observe(time.perf_counter() - started)
                written = upto
                self.written[task.task_id] = written
                self._tell_flush()
                last_flush = anyio.current_time()
                if ends:
                    if error_type(batch[-1][1]) == StorageUnavailable.type:
                        self.folders.suspect()  # a write failed: refuse until it is checked
                    self.webhooks.finished(task.task_id)
                    return
        except Exception:
            log.exception("task %s: writing its log failed", task.task_id)
        finally:
            self.persisting.pop(task.task_id, None)
            self.written.pop(task.task_id, None)
            self.failing.discard(task.task_id)
            self._tell_flush()
            task.final_written.set()
            if not released:
                try:
                    # Shielded: a writer cancelled at shutdown still hands its lease back.
                    with anyio.move_on_after(5, shield=True):
                        await self._io.run(self._released, task.task_id)
                except Exception:
                    log.exception("task %s: releasing its lease failed", task.task_id)

    async def _last_write(self, task: Task, batch: list[tuple[int, dict[str, Any]]]) -> bool:
        """The batch ending with the final event, stamped, written with the
        replay record; then the answer goes, then the final is fsynced. True
        once the lease is released."""
        policy = self.retention.stamp(task.task_id, batch[-1][1])
        self.attempts.stamp(task.task_id, batch[-1][1])
        # The replay record rides in the final file (no file, no thread hop
        # of its own) unless it is large.
        record = replay_record(task, policy)
        embed = record is not None and len(record) <= EMBED_LIMIT
        released = await self._io.run(self._write_final, task.task_id, batch,
                                      {REPLAY_RECORD: record} if embed and record else None)
        task.final_written.set()  # the answer goes
        # Its fsync and index entry follow, with other finals' (settle.py).
        self.settler.add(task.task_id)
        # And the folders of the next claims are made (spares.py): once the
        # answer is on its way, so that their file creations neither delay
        # it nor, on the same journal, the run of the next job.
        if self.tasklog.wants_spares:  # no thread hop where none are made (NFS)
            try:
                await anyio.to_thread.run_sync(self.tasklog.prepare_claims)
            except OSError as e:  # the next claims then make their own
                log.debug("cannot make the next claims' folders: %s", e)
        if record is not None and not embed:
            await anyio.to_thread.run_sync(write_replay, self.tasklog, task.task_id, record)
        return released

    def _write_final(self, task_id: str, batch: list[tuple[int, dict[str, Any]]],
                     records: dict[str, bytes] | None = None) -> bool:
        """The task's last write (with ``records`` in its final file) and its
        lease's release in one call (one worker-thread hop, where writes go
        to threads); True once released. A failed release does not make the
        written final event look unwritten."""
        # Returns once a final event is written; its fsync and index entry follow the answer.
        self.tasklog.extend(task_id, batch, records, settle_later=True)
        try:
            self._released(task_id, final=True)
            return True
        except Exception:
            log.exception("task %s: releasing its lease failed", task_id)
            return False

    def _released(self, task_id: str, final: bool = False) -> None:
        self.tasklog.release(task_id, final=final)
        if log.isEnabledFor(logging.DEBUG):  # a listing and a stat per file: not per task by default
            usage = self.tasklog.usage(task_id)
            log.debug("task %s: task log %d files, %d bytes", task_id, usage.files, usage.bytes)

    async def flush(self) -> None:
        """Wait until every event published so far is in the log; running
        tasks go on (Function Compute's pre-freeze: nothing may be lost
        while the instance is frozen)."""
        due = {task_id: task.last_seq for task_id, task in self.persisting.items()}
        self.hurry += 1
        try:
            for task in list(self.persisting.values()):
                task.wake()  # a persister gathering a batch writes it now
            # Not for a log that refuses writes (a full disk): its writer
            # retries on its own, and FC's hook must get an answer.
            while True:
                wrote = self._wrote  # taken before the check: no write slips between
                if not any(task_id in self.persisting and task_id not in self.failing
                           and self.written.get(task_id, 0) < n for task_id, n in due.items()):
                    return
                await wrote.wait()
        finally:
            self.hurry -= 1

    def _tell_flush(self) -> None:
        """A writer wrote, failed or ended: wake :meth:`flush` to look again."""
        self._wrote.set()
        self._wrote = anyio.Event()
