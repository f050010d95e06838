"""Function Compute compatibility through a real server: which header names
the task, FC async calls queryable by FC's task id, the pre-freeze hook and
``execution_time`` in the final event."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Iterator

import anyio
import pytest
import requests

from comfy_embed.config import Settings
from comfy_embed.runtime import Engine
from comfy_embed.service.lifecycle import TaskService
from comfy_embed.tasklog.log import TaskLog

from tests.conftest import image_only, text_to_image
from tests.servers import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("fc"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


_ALL = ("X-Fc-Async-Task-Id", "X-Fc-Trace-Id", "X-Task-Id", "X-Fc-Request-Id")


@pytest.mark.parametrize("present", [_ALL, _ALL[1:], _ALL[2:], _ALL[3:]])
def test_task_id_header_order(server: Server, present: tuple[str, ...]) -> None:
    """The first present of async task id, trace id, X-Task-Id, request id."""
    tag = uuid.uuid4().hex[:8]
    headers = {name: f"{name.lower()}-{tag}" for name in present}
    r = server.run(image_only(batch=1), headers=headers)
    assert r.status_code == 200, r.text
    expected = headers[present[0]]
    assert r.headers["X-Task-Id"] == expected
    assert r.json()["data"]["task_id"] == expected
    assert server.status(expected)[-1]["data"]["task_id"] == expected


def test_no_header_gives_a_fresh_uuid(server: Server) -> None:
    ids = {server.run(image_only(batch=1)).headers["X-Task-Id"] for _ in range(2)}
    assert len(ids) == 2
    for task_id in ids:
        assert uuid.UUID(task_id).version == 4


def test_fc_async_call_is_queryable_by_fc_task_id(server: Server) -> None:
    """FC returns x-fc-async-task-id to the client, which then asks status
    with it; FC's request id (different per delivery) must not win."""
    fc_task = f"fc-async-{uuid.uuid4().hex[:8]}"
    r = server.run(text_to_image(steps=2), headers={
        "X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": fc_task,
        "X-Fc-Request-Id": uuid.uuid4().hex})
    assert r.status_code == 202, r.text
    assert r.json()["task_id"] == fc_task
    events = server.wait_final(fc_task)
    final = events[-1]["data"]
    assert final["status"] == "success" and final["task_id"] == fc_task
    assert final["results"] and final["results"][0]["node_id"] == "9"


def test_execution_time_in_final_event(server: Server) -> None:
    r = server.run(text_to_image(steps=2))
    assert r.status_code == 200, r.text
    took = r.json()["data"]["execution_time"]
    assert isinstance(took, float) and took > 0
    # The same final event in the task log.
    assert server.status(r.headers["X-Task-Id"])[-1]["data"]["execution_time"] == took
    # A refused workflow never ran.
    bad = server.run({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert bad.status_code == 400, bad.text
    assert bad.json()["data"]["execution_time"] == 0


def test_pre_freeze_flushes_without_draining(server: Server) -> None:
    """During a run, /pre-freeze answers 200; the run then finishes and the
    instance still takes work (no drain)."""
    task_id = f"freeze-{uuid.uuid4().hex[:8]}"
    r = server.run(text_to_image(steps=20, size=64),
                   headers={"X-Task-Id": task_id, "X-Fc-Invocation-Type": "Async"})
    assert r.status_code == 202, r.text
    # Wait until the task is running (its progress reaches the log).
    deadline = time.monotonic() + 120
    events: list[dict[str, object]] = []
    while time.monotonic() < deadline and not any(ev["type"] == "progress" for ev in events):
        time.sleep(0.05)  # polling another process, bounded by the deadline
        events = server.status(task_id)
    assert any(ev["type"] == "progress" for ev in events), events
    r = requests.get(f"{server.url}/pre-freeze", timeout=60)
    assert r.status_code == 200, r.text
    assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200
    final = server.wait_final(task_id, timeout=600)[-1]["data"]
    assert final["status"] == "success", final
    assert server.run(image_only(batch=1)).status_code == 200


@pytest.mark.anyio
async def test_flush_waits_for_published_events(engine: Engine, settings: Settings,
                                                tmp_path: Path) -> None:
    """In process: after flush() every event published before it is in the log."""
    service = TaskService(engine, settings, TaskLog(tmp_path, "flush-test"))
    handle = await service.start(text_to_image(steps=10, size=64), task_id="flush-1")
    task = handle.task
    assert task is not None
    with anyio.fail_after(600):
        while not any(ev["type"] == "progress" for ev in task.events):
            await task.changed()
        published = len(task.events)
        await service.flush()
        logged = await anyio.to_thread.run_sync(service.tasklog.read, "flush-1", 0)
        assert len(logged) >= published
        final = await handle.final()
    assert final["data"]["status"] == "success"
