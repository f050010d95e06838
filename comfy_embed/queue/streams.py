"""A work queue on a Redis stream with a consumer group (issue 24).

Why Redis Streams: a consumer group gives each entry to one consumer and
keeps it pending until acknowledged, so work taken by an instance that dies
is still there; ``XAUTOCLAIM`` hands entries idle past the lease to another
consumer; KEDA's ``redis-streams`` scaler scales on the pending entries; and
``redis-server`` is one Debian package for tests.

The queue only carries work (the task id and what to run); the task's events
and outputs stay in the shared task log. Calls block on the network: run
them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from comfy_embed.errors import QueueUnavailable

__all__ = ["QueueUnavailable", "StreamQueue", "Work"]

#: The consumer group every instance reads through.
GROUP = "comfy-embed"


@dataclass(frozen=True)
class Work:
    """One entry: its stream id (to acknowledge) and what it carries."""

    entry_id: str
    task_id: str
    body: bytes
    #: How many times the group delivered it (1: first time; more: reclaimed).
    deliveries: int = 1


class StreamQueue:
    """Entries of ``stream`` read by ``consumer`` through the group :data:`GROUP`."""

    def __init__(self, url: str, stream: str, consumer: str) -> None:
        self.stream = stream
        self.consumer = consumer
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._group_made = False

    def _group(self) -> None:
        if self._group_made:
            return
        try:
            self._redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_made = True

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            self._group()
            return fn(*args, **kw)
        except redis.RedisError as e:
            self._group_made = False  # a restarted server may have lost it
            raise QueueUnavailable(f"the task queue (Redis) is unavailable: {what}: "
                                   f"{type(e).__name__}: {e}") from e

    def reason(self) -> str | None:
        """None while Redis answers, else why not (``/ready``)."""
        try:
            self._call("ping", self._redis.ping)
        except QueueUnavailable as e:
            return e.message
        return None

    def put(self, task_id: str, body: bytes) -> str:
        """Queue one task; its entry id. QueueUnavailable if it was not queued."""
        entry = self._call("add", self._redis.xadd, self.stream,
                           {"task_id": task_id, "body": body})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def take(self, block_seconds: float) -> Work | None:
        """The next entry no consumer has taken, waiting up to ``block_seconds``."""
        answer = self._call("read", self._redis.xreadgroup, GROUP, self.consumer,
                            {self.stream: ">"}, count=1, block=max(1, int(block_seconds * 1000)))
        for _, entries in answer or ():
            for entry_id, fields in entries:
                return _work(entry_id, fields, 1)
        return None

    def reclaim(self, idle_seconds: float) -> Work | None:
        """An entry another consumer took and left unacknowledged for
        ``idle_seconds`` (its instance died), now this consumer's (XAUTOCLAIM)."""
        answer = self._call("autoclaim", self._redis.xautoclaim, self.stream, GROUP,
                            self.consumer, min_idle_time=int(idle_seconds * 1000),
                            start_id="0-0", count=1)
        claimed = answer[1] if answer else []
        for entry_id, fields in claimed:
            if fields:  # a deleted entry comes back empty
                return _work(entry_id, fields, 2)
            self.ack(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
        return None

    def touch(self, entry_id: str) -> None:
        """Keep a taken entry this consumer's while its run goes on (its idle
        time back to zero), so it is not reclaimed as a dead consumer's."""
        self._call("touch", self._redis.xclaim, self.stream, GROUP, self.consumer, 0,
                   [entry_id], justid=True)

    def ack(self, entry_id: str) -> None:
        """The entry's task has its final event: done with it."""
        self._call("ack", self._redis.xack, self.stream, GROUP, entry_id)

    def give_back(self, work: Work) -> None:
        """Put a taken entry back for any consumer now (an instance shutting
        down before running it): queued again, then acknowledged."""
        self.put(work.task_id, work.body)
        self.ack(work.entry_id)

    def pending(self) -> int:
        """Entries taken and not yet acknowledged, all consumers together."""
        summary = self._call("pending", self._redis.xpending, self.stream, GROUP)
        return int(summary["pending"]) if summary else 0

    def close(self) -> None:
        self._redis.close()


def _work(entry_id: bytes | str, fields: dict[bytes, bytes], deliveries: int) -> Work:
    return Work(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
                fields[b"task_id"].decode(), fields[b"body"], deliveries)
