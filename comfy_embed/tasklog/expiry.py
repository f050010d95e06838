"""When a task's inputs, outputs and log go: the operator's retention, a
request's own ``ttl``, or keep nothing (issue 29).

A request may shorten its task's retention (``?ttl=`` seconds, at most the
operator's ``COMFY_EMBED_MAX_TTL`` and never past the retention period) or
keep nothing (its inputs and outputs go once the answer is delivered). Such
a task gets, at start, a ``retention.json`` record (:class:`Policy`) and an
entry in the expiry index ``@index/expires/<bucket>/<task_id>`` keyed by the
earliest time it may expire; every instance's upkeep sweeps the due
buckets (retention.py :func:`~comfy_embed.tasklog.retention.sweep`), so any
instance deletes it on time, even if the one that ran it died.

:func:`expires_at` is the one rule for the ``expires_at`` that every answer,
the status and Comfy API v2's jobs carry: the end of the task plus its ttl
(ISO 8601, UTC), None while the retention is off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from comfy_embed.events import dumps_bytes, loads
from comfy_embed.tasklog.files import FINAL_FILE
from comfy_embed.tasklog.index import DoneIndex
from comfy_embed.tasklog.log import TaskLog

__all__ = [
    "KEEP_ALL",
    "KEEP_NOTHING",
    "RECORD",
    "Policy",
    "expires_at",
    "expiry_index",
    "iso",
    "read_policy",
    "task_expires_at",
    "write_policy",
]

KEEP_ALL = "all"
KEEP_NOTHING = "nothing"
#: The record of a task's own policy, in its folder.
RECORD = "retention.json"


@dataclass(frozen=True)
class Policy:
    """A task's retention: ``ttl`` seconds after it ends (None: the
    operator's retention period), and what it keeps (``keep``: "all", or
    "nothing": inputs and outputs go once the answer is delivered)."""

    ttl: float | None = None
    keep: str = KEEP_ALL

    @property
    def is_default(self) -> bool:
        """Whether the task follows the operator's retention (no record needed)."""
        return self.ttl is None and self.keep == KEEP_ALL

    @property
    def keeps_inputs(self) -> bool:
        """Whether inputs (and the resolved graph) outlive the answer."""
        return self.keep != KEEP_NOTHING

    def seconds(self, retention_seconds: float | None) -> float | None:
        """Seconds from the task's end to its deletion (None: never)."""
        if self.keep == KEEP_NOTHING:
            return 0.0
        if self.ttl is not None:
            return self.ttl if retention_seconds is None else min(self.ttl, retention_seconds)
        return retention_seconds


def iso(when: float | None) -> str | None:
    """``when`` (a Unix time) as ISO 8601 UTC with a ``Z``, whole seconds up."""
    if when is None:
        return None
    return datetime.fromtimestamp(-(-when // 1), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expires_at(finished_at: float, policy: Policy, retention_seconds: float | None
               ) -> str | None:
    """The ``expires_at`` of a task that ended at ``finished_at`` (Unix
    time) under ``policy``, with the operator's retention of
    ``retention_seconds`` (None: kept forever). For Comfy API v2 too: a
    job's ``expires_at`` is this, from the job's end."""
    seconds = policy.seconds(retention_seconds)
    return None if seconds is None else iso(finished_at + seconds)


def expiry_index(tasklog: TaskLog) -> DoneIndex:
    """The expiry index of ``tasklog``: tasks with a policy of their own, by
    the earliest time they may expire."""
    return DoneIndex(tasklog.root, "expires")


def write_policy(tasklog: TaskLog, task_id: str, policy: Policy, now: float) -> None:
    """Record a task's own policy and index it (blocking: a worker thread,
    or the loop while the disk is quick). A default policy writes nothing."""
    if policy.is_default:
        return
    payload: dict[str, Any] = {"ttl": policy.ttl, "keep": policy.keep}
    tasklog.put_record(task_id, RECORD, dumps_bytes(payload), durable=True)
    # Due at once for keep-nothing; the sweep waits for the final event.
    expiry_index(tasklog).add(task_id, now + (0.0 if policy.ttl is None else policy.ttl))


def read_policy(tasklog: TaskLog, task_id: str) -> Policy:
    """The task's own policy, or the default one."""
    try:
        raw = tasklog.get_record(task_id, RECORD)
    except (FileNotFoundError, NotADirectoryError):
        raw = None
    if raw is None:
        return Policy()
    try:
        value = loads(raw)
        ttl = value.get("ttl")
        return Policy(None if ttl is None else float(ttl), str(value.get("keep") or KEEP_ALL))
    except (ValueError, TypeError, AttributeError):
        return Policy()


def finished_at(tasklog: TaskLog, task_id: str) -> float | None:
    """When the task's final event was written (None: not finished)."""
    try:
        return os.stat(tasklog.task_dir(task_id) / FINAL_FILE).st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None


def task_expires_at(tasklog: TaskLog, task_id: str, retention_seconds: float | None
                    ) -> str | None:
    """The ``expires_at`` of a task in the log (blocking: call from a worker
    thread), for a status or a v2 job read after the fact: its end plus its
    own ttl; None while it runs or when retention is off."""
    end = finished_at(tasklog, task_id)
    if end is None:
        return None
    return expires_at(end, read_policy(tasklog, task_id), retention_seconds)
