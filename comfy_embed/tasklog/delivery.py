"""Webhook delivery state, kept as records beside a task's events.

A task's webhook delivery lives in its own records of the task folder
(:meth:`~.log.TaskLog.put_record`), beside (never inside) the event files,
and is written with the same exclusive, atomic publishing:
``webhook.json`` (the request: URL, events, id), ``webhook.lease.NNNN`` (who
delivers: a lease of leases.py; a higher number supersedes),
``webhook.try.NNNN.json`` (attempt N is being sent: exclusive, so attempt N
goes out once), ``webhook.result.NNNN.json`` (its outcome and next try) and
``webhook.done`` (delivered, or given up).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from comfy_embed.tasklog.files import parse
from comfy_embed.tasklog.index import NameIndex
from comfy_embed.tasklog.log import TaskLog

__all__ = ["DeliveryLog"]

log = logging.getLogger(__name__)

_WEBHOOK = "webhook.json"
_DONE = "webhook.done"
_LEASE_PREFIX = "webhook.lease."
_LEASE = re.compile(r"webhook\.lease\.(\d{4,})")
_TRY = re.compile(r"webhook\.try\.(\d{4,})\.json")
_RESULT = re.compile(r"webhook\.result\.(\d{4,})\.json")


def _numbers(pattern: re.Pattern[str], names: Iterable[str]) -> list[int]:
    """The numbers of the names that ``pattern`` matches, sorted."""
    return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))


class DeliveryLog:
    """Webhook delivery state of the tasks in a :class:`TaskLog`, shared by instances.

    Leases are the log's own kind (:attr:`TaskLog.leases`: its instance id,
    ``lease_seconds`` and clock), but a lease is taken over by publishing the
    next generation, so of two instances that both find an expired lease
    only one wins. Every method blocks on file I/O: call them from a worker
    thread.
    """

    def __init__(self, tasklog: TaskLog) -> None:
        self.tasklog = tasklog
        self.leases = tasklog.leases
        #: The tasks with a webhook not yet done: what :meth:`pending` looks at.
        self.index = NameIndex(tasklog.root, "webhooks")

    @property
    def lease_seconds(self) -> float:
        """How long a delivery lease lasts without renewal."""
        return self.leases.seconds

    def _load(self, task_id: str, name: str) -> Any:
        return parse(self.tasklog.get_record(task_id, name), f"{task_id}/{name}")

    def _put(self, task_id: str, name: str, record: dict[str, Any]) -> bool:
        return self.tasklog.put_record(task_id, name, json.dumps(record).encode(), durable=True)

    def _lease(self, task_id: str, gen: int) -> Path:
        return self.tasklog.task_dir(task_id) / f"{_LEASE_PREFIX}{gen:04d}"

    def _generations(self, task_id: str) -> list[int]:
        return _numbers(_LEASE, self.tasklog.records(task_id, _LEASE_PREFIX))

    def register(self, task_id: str, request: dict[str, Any]) -> bool:
        """Record the task's webhook request; False if it already has one."""
        # Like a write, the request makes the task's folder if need be.
        self.tasklog.task_dir(task_id).mkdir(parents=True, exist_ok=True)
        self.index.add(task_id)  # first: a crash after the request must leave it findable
        return self._put(task_id, _WEBHOOK, request)

    def request(self, task_id: str) -> dict[str, Any] | None:
        """The recorded request, or None (no webhook, or no such task)."""
        return self._load(task_id, _WEBHOOK)

    def claim(self, task_id: str) -> int | None:
        """Take the delivery lease: the new generation, or None while another
        instance (or this one, elsewhere) holds an unexpired lease."""
        gens = self._generations(task_id)
        if gens and self.leases.live(self._lease(task_id, gens[-1])):
            return None
        gen = (gens[-1] if gens else 0) + 1
        if not self.leases.take(self._lease(task_id, gen)):
            return None  # another instance took this generation first
        return gen

    def holds(self, task_id: str, gen: int) -> bool:
        """Whether generation ``gen`` is still the newest lease (nobody took over)."""
        return max(self._generations(task_id), default=0) == gen

    def renew(self, task_id: str, gen: int) -> bool:
        """Refresh our lease; False once another instance took over."""
        return self.holds(task_id, gen) and self.leases.renew(self._lease(task_id, gen))

    def release(self, task_id: str, gen: int) -> None:
        """Expire our lease at once, so another instance may resume without waiting."""
        if self.holds(task_id, gen):
            self.leases.release(self._lease(task_id, gen))

    def begin_attempt(self, task_id: str, attempt: int, record: dict[str, Any]) -> bool:
        """Reserve attempt number ``attempt`` before sending it; False if it
        was already reserved (by a stale owner, or a rival): then do not send."""
        return self._put(task_id, f"webhook.try.{attempt:04d}.json", record)

    def end_attempt(self, task_id: str, attempt: int, record: dict[str, Any]) -> None:
        """Record how attempt ``attempt`` ended (status, error, next try)."""
        self._put(task_id, f"webhook.result.{attempt:04d}.json", record)

    def finish(self, task_id: str, record: dict[str, Any]) -> bool:
        """Mark the delivery done (delivered, failed or not wanted); once only."""
        first = self._put(task_id, _DONE, record)
        try:
            self.index.drop(task_id)
        except OSError as e:  # the next pending() drops it
            log.warning("webhook of task %s: cannot drop its index entry: %s", task_id, e)
        return first

    def state(self, task_id: str) -> dict[str, Any] | None:
        """Everything recorded about the task's delivery, or None without a webhook:
        ``request``, ``attempts`` (each the begin record merged with its
        result, in order), ``done`` (or None) and ``lease`` (the newest one:
        ``instance_id``, ``generation``, ``renewed_at``; or None)."""
        request = self._load(task_id, _WEBHOOK)
        if request is None:
            return None
        names = self.tasklog.records(task_id, "webhook.")
        results = set(_numbers(_RESULT, names))
        attempts: list[dict[str, Any]] = []
        for n in _numbers(_TRY, names):
            record = dict(self._load(task_id, f"webhook.try.{n:04d}.json") or {})
            record["attempt"] = n
            if n in results:
                record.update(self._load(task_id, f"webhook.result.{n:04d}.json") or {})
            attempts.append(record)
        gens = _numbers(_LEASE, names)
        return {"request": request, "attempts": attempts, "done": self._load(task_id, _DONE),
                "lease": self._lease_state(task_id, gens[-1]) if gens else None}

    def _lease_state(self, task_id: str, gen: int) -> dict[str, Any] | None:
        path = self._lease(task_id, gen)
        holder = self.leases.holder(path)
        try:
            return {"instance_id": holder, "generation": gen,
                    "renewed_at": self.leases.renewed_at(path)}
        except FileNotFoundError:
            return None

    def undelivered(self, task_id: str) -> bool:
        """Whether the task has a webhook not yet delivered or given up."""
        return (self.tasklog.has_record(task_id, _WEBHOOK)
                and not self.tasklog.has_record(task_id, _DONE))

    def pending(self) -> list[str]:
        """Tasks with a final event and a webhook not yet done whose lease is
        free or expired: deliveries some instance should (re)start. Looks at
        the tasks in the webhook index (index.py); a log from before it
        gets one scan of every folder, which indexes them."""
        out: list[str] = []
        now = self.leases.clock()
        tasklog, index = self.tasklog, self.index
        full = not index.complete()
        for task_id in tasklog.task_ids() if full else index.names():
            if not tasklog.valid_task_id(task_id):
                continue
            if not tasklog.has_record(task_id, _WEBHOOK):
                # Registered before its task can end: with a final event and
                # no request, the registration failed (or the folder is gone).
                if not full and (not tasklog.exists(task_id) or tasklog.is_final(task_id)):
                    index.drop(task_id)
                continue
            if tasklog.has_record(task_id, _DONE):
                if not full:
                    index.drop(task_id)  # a crash between done and the drop
                continue
            if full:
                index.add(task_id)
            if not tasklog.is_final(task_id):
                continue
            gens = self._generations(task_id)
            if gens and self.leases.live(self._lease(task_id, gens[-1]), now):
                continue
            out.append(task_id)
        if full:
            index.mark_complete()
        return out
