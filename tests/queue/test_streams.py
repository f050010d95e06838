"""Tests for comfy_embed.queue.streams against a real redis-server (Debian's
package) on 127.0.0.1: one consumer per entry, reclaim after the lease,
give back, and Redis down."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_embed.queue import QueueUnavailable, StreamQueue
from tests.servers import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server)")


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, folder: Path, persist: bool = False) -> None:
        #: With ``persist``, an append-only file fsynced on every write (in
        #: ``folder``): what was accepted survives a kill -9 and a restart.
        self.persist = persist
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = StreamQueue(self.url, "probe", "probe")
        deadline = time.monotonic() + 20
        while probe.reason() is not None:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)  # polling a process that is starting: bounded by the deadline
        probe.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def test_each_entry_goes_to_one_consumer(redis_server: RedisServer) -> None:
    a = StreamQueue(redis_server.url, "tasks", "a")
    b = StreamQueue(redis_server.url, "tasks", "b")
    for i in range(4):
        a.put(f"t{i}", b'{"n": %d}' % i)
    taken = [q.take(0.1) for q in (a, b, a, b)]
    assert sorted(w.task_id for w in taken if w) == ["t0", "t1", "t2", "t3"]
    assert a.take(0.05) is None and b.take(0.05) is None
    assert a.pending() == 4
    for w in taken:
        assert w is not None
        a.ack(w.entry_id)
    assert a.pending() == 0


def test_a_dead_consumers_entry_is_reclaimed_after_the_lease(redis_server: RedisServer) -> None:
    dead = StreamQueue(redis_server.url, "tasks", "dead")
    alive = StreamQueue(redis_server.url, "tasks", "alive")
    dead.put("t1", b"{}")
    work = dead.take(0.1)
    assert work is not None and work.deliveries == 1
    assert alive.reclaim(idle_seconds=5) is None  # still within the lease
    time.sleep(0.3)  # the lease below is 0.2 s: the entry must sit idle that long
    again = alive.reclaim(idle_seconds=0.2)
    assert again is not None and again.task_id == "t1" and again.deliveries == 2
    assert again.entry_id == work.entry_id and again.body == b"{}"
    alive.ack(again.entry_id)
    assert alive.pending() == 0


def test_give_back_puts_it_first_in_line_for_others(redis_server: RedisServer) -> None:
    leaving = StreamQueue(redis_server.url, "tasks", "leaving")
    other = StreamQueue(redis_server.url, "tasks", "other")
    leaving.put("t1", b"x")
    work = leaving.take(0.1)
    assert work is not None
    leaving.give_back(work)
    assert leaving.pending() == 0
    back = other.take(0.1)
    assert back is not None and back.task_id == "t1" and back.body == b"x"


def test_redis_down_is_queue_unavailable_and_back_again(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    q = StreamQueue(server.url, "tasks", "a")
    try:
        q.put("t1", b"x")
        server.stop()
        assert q.reason() is not None and "unavailable" in (q.reason() or "")
        with pytest.raises(QueueUnavailable) as e:
            q.put("t2", b"y")
        assert e.value.type == "queue_unavailable"
        server.start()  # empty: no persistence in this test
        assert q.reason() is None
        q.put("t3", b"z")  # the group is made again
        work = q.take(0.1)
        assert work is not None and work.task_id == "t3"
    finally:
        server.stop()


def test_a_touched_entry_is_not_reclaimed(redis_server: RedisServer) -> None:
    working = StreamQueue(redis_server.url, "tasks", "working")
    other = StreamQueue(redis_server.url, "tasks", "other")
    working.put("t1", b"{}")
    work = working.take(0.1)
    assert work is not None
    time.sleep(0.3)  # idle past the 0.2 s lease below...
    working.touch(work.entry_id)  # ...but its run goes on: kept
    assert other.reclaim(idle_seconds=0.2) is None
    working.ack(work.entry_id)
