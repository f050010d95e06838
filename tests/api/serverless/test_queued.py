"""Issue 24's durable queue mode on real servers sharing a task log and a real
redis-server: any instance runs what any accepted, a killed instance's task
completes on another without a client retry, Redis down is 503."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests

from comfy_embed.tasklog.attempts import is_lost
from comfy_embed.tasklog.log import TaskLog
from tests.conftest import image_only, text_to_image
from tests.queue.test_streams import RedisServer
from tests.servers import Server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server)")

LEASE = 4
ASYNC = {"X-Fc-Invocation-Type": "Async"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-log")


def start(base: Path, shared_log: Path, redis_server: RedisServer) -> Server:
    return Server(base, task_log_dir=shared_log, lease_seconds=LEASE,
                  redis_url=redis_server.url)


@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory, shared_log: Path,
           redis_server: RedisServer) -> Iterator[Server]:
    s = start(tmp_path_factory.mktemp("steady"), shared_log, redis_server)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def settled(server: Server, task_id: str, timeout: float = 600) -> dict:
    """The final event's data once it is not a lost attempt the queue still
    holds (in queue mode a lost attempt's final is followed by the next)."""
    deadline = time.monotonic() + timeout
    while True:
        final = server.wait_final(task_id, timeout=timeout)[-1]
        if not is_lost(final) or final["data"].get("attempt", 1) >= 3:
            return final["data"]
        assert time.monotonic() < deadline, (task_id, final)
        time.sleep(0.1)


def submit(server: Server, graph: dict, task_id: str) -> None:
    r = server.run(graph, headers={**ASYNC, "X-Task-Id": task_id})
    assert r.status_code == 202, r.text


def test_async_runs_go_through_the_queue(steady: Server) -> None:
    ids = [f"q-{i}-{uuid.uuid4().hex[:8]}" for i in range(4)]
    for task_id in ids:
        submit(steady, image_only(), task_id)
    for task_id in ids:
        events = steady.wait_final(task_id, timeout=120)
        assert events[-1]["data"]["status"] == "success", events[-1]
        assert events[-1]["data"]["attempt"] == 1
        assert sum(e["type"] == "serverless_api" for e in events) == 1
    # A bad graph is refused when taken: its final error event says why.
    bad = image_only()
    bad["1"]["inputs"]["width"] = "wide"
    bad_id = "q-bad-" + uuid.uuid4().hex[:8]
    submit(steady, bad, bad_id)
    refused = steady.wait_final(bad_id, timeout=60)[-1]["data"]
    assert refused["status"] == "error" and "width" in refused["error"]["message"], refused


def owner_pid(shared_log: Path, task_id: str) -> int | None:
    owner = TaskLog(shared_log, "reader").owner(task_id)
    return int(owner.split("-")[-2]) if owner else None


def test_a_killed_instance_task_completes_elsewhere(
        tmp_path: Path, shared_log: Path, redis_server: RedisServer, steady: Server) -> None:
    victim = start(tmp_path / "victim", shared_log, redis_server).wait_ready()
    try:
        # Work for both: the victim takes some of it while steady is busy.
        ids = [f"k-{i}-{uuid.uuid4().hex[:8]}" for i in range(4)]
        for task_id in ids:
            submit(victim, text_to_image(steps=30, size=192, seed=3), task_id)
        deadline = time.monotonic() + 120
        killed = None
        while killed is None:
            assert time.monotonic() < deadline, victim.log()
            for task_id in ids:
                events = steady.status(task_id)
                if owner_pid(shared_log, task_id) == victim.proc.pid and events and any(
                        e["type"] == "progress" for e in events) and \
                        events[-1]["type"] != "serverless_api":
                    killed = task_id
                    break
            time.sleep(0.05)
    finally:
        victim.kill()
        victim.stop()
    for task_id in ids:
        final = settled(steady, task_id)
        assert final["status"] == "success", (task_id, final.get("error"), steady.log())
    assert settled(steady, killed)["attempt"] >= 2


def test_redis_down_is_503_and_ready_says_why(steady: Server, redis_server: RedisServer) -> None:
    redis_server.stop()
    try:
        r = steady.run(image_only(), headers={**ASYNC, "X-Task-Id": "down-" + uuid.uuid4().hex})
        assert r.status_code == 503, r.text
        assert r.json()["data"]["error"]["type"] == "queue_unavailable"
        ready = requests.get(f"{steady.url}/ready", timeout=10)
        assert ready.status_code == 503 and "Redis" in ready.json()["reason"]
        # A sync run does not need the queue.
        assert steady.run(image_only()).status_code == 200
    finally:
        redis_server.start()
    deadline = time.monotonic() + 30
    while requests.get(f"{steady.url}/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    task_id = "back-" + uuid.uuid4().hex
    submit(steady, image_only(), task_id)
    assert steady.wait_final(task_id, timeout=60)[-1]["data"]["status"] == "success"


def output_folders(servers: list[Server], task_id: str) -> int:
    """On how many instances the task's output folder holds a picture."""
    return sum(any((s.output_dir / task_id).glob("*.png")) for s in servers)


def test_thirty_tasks_over_three_instances_one_killed(
        tmp_path: Path, shared_log: Path, redis_server: RedisServer, steady: Server) -> None:
    victim = start(tmp_path / "victim", shared_log, redis_server)
    third = start(tmp_path / "third", shared_log, redis_server)
    fleet = [steady, victim.wait_ready(), third.wait_ready()]
    try:
        ids = [f"f{i:02d}-{uuid.uuid4().hex[:8]}" for i in range(30)]
        for i, task_id in enumerate(ids):
            submit(fleet[i % 3], text_to_image(steps=12, size=128, seed=i), task_id)
        deadline = time.monotonic() + 180
        killed = None
        while killed is None:
            assert time.monotonic() < deadline, victim.log()
            for task_id in ids:
                events = steady.status(task_id)
                if owner_pid(shared_log, task_id) == victim.proc.pid and events and any(
                        e["type"] == "progress" for e in events) and \
                        events[-1]["type"] != "serverless_api":
                    killed = task_id
                    break
            time.sleep(0.05)
        victim.kill()
        killed_at = time.monotonic()
        settled(steady, killed)
        recovered_after = time.monotonic() - killed_at
        finals = {task_id: settled(steady, task_id) for task_id in ids}
        elapsed = time.monotonic() - killed_at
        for task_id, final in finals.items():
            assert final["status"] == "success", (task_id, final.get("error"))
            successes = [a for a in final.get("attempts", [final]) if a["status"] == "success"]
            assert len(successes) == 1, final  # none ran to success twice
            assert output_folders(fleet, task_id) == 1, task_id
        assert finals[killed]["attempt"] >= 2
        assert finals[killed]["attempts"][0]["error"]["type"] == "task_lost"
        # The figure the issue asks for (reported, never asserted).
        print(f"\n30 tasks, 3 instances, one killed -9: killed task {killed} done "
              f"{recovered_after:.1f}s after the kill (lease {LEASE}s), all 30 "
              f"{elapsed:.1f}s after it")
    finally:
        victim.stop()
        third.stop()


def test_sigterm_hands_queued_work_to_the_others(
        tmp_path: Path, shared_log: Path, redis_server: RedisServer, steady: Server) -> None:
    leaving = Server(tmp_path / "leaving", task_log_dir=shared_log, lease_seconds=LEASE,
                     redis_url=redis_server.url, drain_seconds=1).wait_ready()
    try:
        ids = [f"s{i}-{uuid.uuid4().hex[:8]}" for i in range(5)]
        for task_id in ids:
            submit(leaving, text_to_image(steps=40, size=128, seed=5), task_id)
        deadline = time.monotonic() + 120
        while not any(owner_pid(shared_log, t) == leaving.proc.pid
                      and any(e["type"] == "progress" for e in steady.status(t)) for t in ids):
            assert time.monotonic() < deadline, leaving.log()
            time.sleep(0.05)
    finally:
        leaving.stop()  # SIGTERM: a 1 s grace, then its run is interrupted and put back
    assert "cancelling" in leaving.log()  # it did interrupt a run
    for task_id in ids:
        final = settled(steady, task_id)
        assert final["status"] == "success", (task_id, final.get("error"), steady.log())


def test_redis_killed_mid_load_loses_nothing(tmp_path: Path, shared_log: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis", persist=True)
    (tmp_path / "redis").mkdir()
    redis_server.start()
    server = start(tmp_path / "loaded", shared_log, redis_server).wait_ready()
    try:
        ids = [f"r{i}-{uuid.uuid4().hex[:8]}" for i in range(6)]
        for task_id in ids:
            submit(server, text_to_image(steps=30, size=128, seed=8), task_id)
        deadline = time.monotonic() + 300
        while not any(e["type"] == "progress" for e in server.status(ids[0])):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        redis_server.stop()  # kill -9, mid-load: one running, five waiting in Redis
        waiting = [t for t in ids if not server.status(t)]  # not yet taken: only in Redis
        assert waiting, "all were taken before Redis went down: not mid-load"
        r = server.run(image_only(), headers={**ASYNC, "X-Task-Id": "r-down"})
        assert r.status_code == 503 and r.json()["data"]["error"]["type"] == "queue_unavailable"
        assert r.headers.get("Retry-After")
        redis_server.start()  # the same port and append-only file
        for task_id in ids:  # every accepted task ends, with success
            final = settled(server, task_id)
            assert final["status"] == "success", (task_id, final.get("error"), server.log())
        submit(server, image_only(), "r-back-" + uuid.uuid4().hex[:8])
    finally:
        server.stop()
        redis_server.stop()
