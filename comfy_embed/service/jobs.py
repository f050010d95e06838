"""Comfy API v2 jobs over the task service: a job IS a task (its id is the
task id, in the one id space of the FC API), run by :class:`TaskService`
and read back from memory or the shared task log like any task.

v2 adds, in the task's folder of the shared log: a ``v2job`` record (when it
was created, its labels, its node count) and a ``v2workflow`` record (the
graph as submitted, without ``extra_data``); and one empty file per job in
``<log>/@v2/jobs/<owner>/`` named so that a listing is newest first, which
is what ``GET /api/v2/jobs`` pages through. Nothing lives only in memory
(the records it keeps in memory are immutable copies), so any instance
sharing the folder answers for any job.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from comfy_embed.errors import InvalidParameter
from comfy_embed.events import FINAL, coalesce_snapshots
from comfy_embed.prepare.options import RunOptions
from comfy_embed.service.blocking import BlockingCalls
from comfy_embed.service.idempotency import IdempotencyStore
from comfy_embed.service.jobview import JobRecord, JobState, job_state
from comfy_embed.service.lifecycle import TaskService
from comfy_embed.taskid import valid_task_id
from comfy_embed.tasklog.files import FINAL_FILE
from comfy_embed.webhooks.request import WebhookRequest

__all__ = ["ANONYMOUS", "JobService", "JobView", "expires_at", "is_bad_cursor"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: The owner of jobs and assets made with API keys off.
ANONYMOUS = "anonymous"
_RECORD = "v2job"
#: The final error type of a task deleted on request (issue 29's tombstone).
_DELETED = "task_deleted"
#: Far enough ahead that ``_EPOCH_US - created (microseconds)`` sorts newest first as text.
_EPOCH_US = 10 ** 17
_CACHE = 4096
#: How often an instance clears old idempotency records and list entries.
_SWEEP_SECONDS = 3600.0
#: The details of a refused cursor (the API answers ``invalid_cursor``).
_CURSOR = {"parameter": "cursor"}


def expires_at(settings_hours: float | None, completed: float | None, created: float) -> float:
    """When retention deletes the job (from its end, or its creation while it
    runs); retention off: a hundred years on."""
    base = completed if completed is not None else created
    if not settings_hours:
        return base + 100 * 365 * 86400
    return base + settings_hours * 3600


class JobView:
    """One job as a GET answers it."""

    def __init__(self, job_id: str, record: JobRecord, state: JobState) -> None:
        self.job_id, self.record, self.state = job_id, record, state


class JobService:
    """Submits, reads, lists and cancels v2 jobs through a TaskService."""

    def __init__(self, tasks: TaskService) -> None:
        self.tasks = tasks
        self.root: Path = tasks.tasklog.root
        self.index = self.root / "@v2" / "jobs"
        #: job id -> (owner hash or ANONYMOUS, record): both immutable once written.
        self._known: OrderedDict[str, tuple[str, JobRecord]] = OrderedDict()
        #: Its own timing of the same disk the service's claims go to.
        self._io = BlockingCalls(tasks.settings.tasklog.inline_seconds)
        #: Jobs running here that a caller asked to cancel (the log has it too).
        self._canceling: set[str] = set()
        #: When this instance last cleared out old idempotency records and
        #: list entries (monotonic); see :meth:`housekeeping`.
        self._swept = time.monotonic()

    # ------------------------------------------------------------ submit
    async def submit(self, workflow: dict[str, Any], *, extra_data: dict[str, Any] | None,
                     metadata: dict[str, str], owner_key: str | None,
                     options: RunOptions, webhook: WebhookRequest | None = None) -> JobView:
        """Start the job (ComfyEmbedError when refused, as TaskService.start)."""
        job_id = f"job_{uuid.uuid4().hex}"
        body: dict[str, Any] = {"prompt": workflow}
        if extra_data:
            # Reaches nodes as ComfyUI's extra_data; never written anywhere.
            body["extra_data"] = extra_data
        record = JobRecord.of(job_id, time.time(), metadata, workflow)
        await self.tasks.start(body, options, task_id=job_id, owner_key=owner_key,
                               webhook=webhook)
        owner = owner_key or ANONYMOUS
        try:
            await self.run_io(self._write_records, record, workflow, owner)
        except OSError as e:
            # The job runs all the same (a retry would run it twice): it reads
            # as a task without labels or workflow, and is not listed.
            log.warning("job %s: cannot write its v2 record: %s", job_id, e)
        self._remember(job_id, owner, record)
        state = await self._state(job_id, record)
        return JobView(job_id, record, state or JobState())

    def _write_records(self, record: JobRecord, workflow: dict[str, Any], owner: str) -> None:
        log = self.tasks.tasklog
        # Not fsynced, as the task's own claim is not: only final events are.
        log.put_record(record.job_id, _RECORD, record.to_json(workflow))
        folder = self.index / owner
        name = f"{_EPOCH_US - int(record.created_at * 1_000_000):017d}-{record.job_id}"
        try:
            fd = os.open(folder / name, os.O_CREAT | os.O_WRONLY, 0o644)
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)

    def _remember(self, job_id: str, owner: str, record: JobRecord) -> None:
        self._known[job_id] = (owner, record)
        self._known.move_to_end(job_id)
        while len(self._known) > _CACHE:
            self._known.popitem(last=False)

    # -------------------------------------------------------------- read
    def _load(self, job_id: str) -> tuple[str, JobRecord] | None:
        """Owner and record from the log (blocking); None if no such task."""
        log = self.tasks.tasklog
        d = log.task_dir(job_id)
        try:
            raw = log.get_record(job_id, _RECORD)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if raw is not None:
            record = JobRecord.parse(raw)[0]
        else:
            try:  # a task made by the FC API: seen as a job too
                record = JobRecord(job_id, os.stat(d).st_mtime)
            except (FileNotFoundError, NotADirectoryError):
                return None
        return log.key_hash(job_id) or ANONYMOUS, record

    async def _owned(self, job_id: str, owner_key: str | None) -> JobRecord | None:
        """The job's record if it exists and the caller may see it."""
        if not valid_task_id(job_id):
            return None
        known = self._known.get(job_id)
        if known is None:
            loaded = await anyio.to_thread.run_sync(self._load, job_id)
            if loaded is None:
                return None
            known = loaded
            if loaded[1].nodes_total:  # a v2 record: final, worth keeping
                self._remember(job_id, *loaded)
        owner, record = known
        if owner_key is not None and owner != owner_key:
            return None
        return record

    async def _state(self, job_id: str, record: JobRecord) -> JobState | None:
        live = self.tasks.handle(job_id).task
        if live is not None:
            events = await self.tasks.read(job_id)
            return job_state(events, record, cancel_requested=job_id in self._canceling)
        self._canceling.discard(job_id)
        state = await anyio.to_thread.run_sync(self._state_from_log, job_id, record)
        return state

    def _state_from_log(self, job_id: str, record: JobRecord) -> JobState | None:
        log = self.tasks.tasklog
        events = coalesce_snapshots(log.read(job_id))
        if not events and not log.exists(job_id):
            return None  # pruned by retention (or never was)
        final_at = None
        if events and events[-1][1].get("type") == FINAL:
            try:
                final_at = os.stat(log.task_dir(job_id) / FINAL_FILE).st_mtime
            except OSError:
                pass
        return job_state(events, record, cancel_requested=log.cancel_requested(job_id),
                         final_at=final_at)

    async def run_io(self, fn: Callable[..., _T], *args: Any) -> _T:
        """A small blocking file operation where the service runs its claims:
        on the loop while the log's disk answers quickly, else in a thread."""
        return await self._io.run(fn, *args)

    def cancel_pending(self, job_id: str) -> bool:
        """Whether a caller of this instance asked to cancel the job."""
        return job_id in self._canceling

    async def get(self, job_id: str, owner_key: str | None) -> JobView | None:
        record = await self._owned(job_id, owner_key)
        if record is None:
            return None
        state = await self._state(job_id, record)
        if state is None or (state.error or {}).get("code") == _DELETED:
            self._known.pop(job_id, None)  # gone: deleted, or pruned by retention
            return None
        return JobView(job_id, record, state)

    async def delete(self, job_id: str, owner_key: str | None) -> bool:
        """Delete the job now (issue 29's task delete: cancelled if it runs,
        its inputs, outputs and events removed); False if unknown or not yours."""
        if await self.get(job_id, owner_key) is None:
            return False
        done = await self.tasks.delete(job_id, owner_key)
        self._known.pop(job_id, None)
        return done is not None

    async def workflow(self, job_id: str, owner_key: str | None) -> dict[str, Any] | None:
        if await self._owned(job_id, owner_key) is None:
            return None
        try:
            raw = await anyio.to_thread.run_sync(self.tasks.tasklog.get_record, job_id, _RECORD)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return JobRecord.parse(raw)[1] if raw is not None else None

    async def cancel(self, job_id: str, owner_key: str | None) -> JobView | None:
        """Ask for cancellation (idempotent); the job as it stands."""
        record = await self._owned(job_id, owner_key)
        if record is None:
            return None
        outcome = await self.tasks.cancel(job_id)
        if outcome == "cancelling":
            self._canceling.add(job_id)
            # Every instance sees the request (and shows `canceling`).
            await anyio.to_thread.run_sync(self.tasks.tasklog.request_cancel, job_id)
        return await self.get(job_id, owner_key)

    def housekeeping(self, idempotency: IdempotencyStore) -> None:
        """About hourly, on a request's way: in the background, delete the
        idempotency records past their lifetime and the list entries of
        jobs retention deleted (any instance may: they are shared files)."""
        now = time.monotonic()
        if now - self._swept < _SWEEP_SECONDS:
            return
        self._swept = now
        background = self.tasks.engine.background
        if background.attached:
            background.spawn(self._sweep, idempotency, name="comfy api v2 housekeeping")

    async def _sweep(self, idempotency: IdempotencyStore) -> None:
        try:
            await anyio.to_thread.run_sync(idempotency.prune)
            await anyio.to_thread.run_sync(self._drop_gone)
        except OSError as e:
            log.warning("v2 housekeeping: %s", e)

    def _drop_gone(self) -> None:
        """List entries whose task folder is gone (retention, deletes)."""
        log_ = self.tasks.tasklog
        try:
            owners = list(os.scandir(self.index))
        except FileNotFoundError:
            return
        for owner in owners:
            for name in os.listdir(owner.path):
                job_id = name.split("-", 1)[-1]
                if valid_task_id(job_id) and not log_.exists(job_id):
                    try:
                        os.unlink(os.path.join(owner.path, name))
                    except FileNotFoundError:
                        pass

    # -------------------------------------------------------------- list
    async def page(self, owner_key: str | None, *, limit: int, cursor: str | None,
                   metadata: dict[str, str], statuses: set[str]) -> tuple[list[JobView], str | None]:
        """Newest first, ``limit`` at most, after ``cursor``; the next cursor."""
        after = _decode_cursor(cursor) if cursor else None
        names = await anyio.to_thread.run_sync(self._names, owner_key or ANONYMOUS)
        found: list[JobView] = []
        next_cursor = None
        last = ""
        for name in names:
            if after is not None and name <= after:
                continue
            job_id = name.split("-", 1)[1]
            view = await self.get(job_id, owner_key)
            if view is None:
                continue  # pruned by retention since
            if any(view.record.metadata.get(k) != v for k, v in metadata.items()):
                continue
            if statuses and view.state.status not in statuses:
                continue
            if len(found) == limit:
                next_cursor = _encode_cursor(last)
                break
            found.append(view)
            last = name
        return found, next_cursor

    def _names(self, owner: str) -> list[str]:
        try:
            return sorted(os.listdir(self.index / owner))
        except FileNotFoundError:
            return []


def is_bad_cursor(error: Exception) -> bool:
    """Whether ``error`` refused a list cursor."""
    return isinstance(error, InvalidParameter) and error.details == _CURSOR


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        name = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidParameter("cursor is not a cursor this server gave", details=_CURSOR)
    head, _, job_id = name.partition("-")
    if not (len(head) == 17 and head.isdigit() and valid_task_id(job_id)):
        raise InvalidParameter("cursor is not a cursor this server gave", details=_CURSOR)
    return name
