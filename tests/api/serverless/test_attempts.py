"""Issue 24: a run lost to a crash runs again when Function Compute (or any
client) retries it with the same task id, on real servers sharing a task log."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import image_only, text_to_image
from tests.servers import Server

LEASE = 4
STEPS = 30
SIZE = 256


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-log")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory, shared_log: Path) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("other"), task_log_dir=shared_log, lease_seconds=LEASE)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def kill_mid_run(victim: Server, other: Server, task_id: str, steps: int) -> None:
    """Submit async on ``victim`` and kill -9 it once ``other`` sees the sampler run."""
    try:
        r = victim.run(text_to_image(steps=steps, size=SIZE, seed=7),
                       headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": task_id})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while not any(e["type"] == "progress" for e in other.status(task_id)):
            assert time.monotonic() < deadline, victim.log()
            time.sleep(0.05)
    finally:
        victim.kill()
        victim.stop()


def test_fc_async_retry_after_crash_succeeds_on_attempt_2(
        tmp_path: Path, shared_log: Path, other: Server) -> None:
    # The scenario: 30 steps on the tiny checkpoint, kill -9 mid-run
    # (the victim samples slowly: a big latent, so the kill lands mid-run).
    victim = Server(tmp_path / "victim", task_log_dir=shared_log, lease_seconds=LEASE).wait_ready()
    task_id = "fcretry-" + uuid.uuid4().hex
    kill_mid_run(victim, other, task_id, STEPS)
    lost = other.wait_final(task_id, timeout=60)[-1]["data"]
    assert lost["error"]["type"] == "task_lost" and lost["attempt"] == 1

    # FC retries the async invocation with the same task id: it runs again.
    retry = other.run(text_to_image(steps=STEPS, size=SIZE, seed=7),
                      headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": task_id})
    assert retry.status_code == 202, retry.text
    events = other.wait_final(task_id, timeout=300)
    final = events[-1]["data"]
    assert final["status"] == "success" and final["attempt"] == 2, (final.get("error"), other.log())
    assert len(final["results"]) == 1
    assert [(a["attempt"], a["status"]) for a in final["attempts"]] == [(1, "error"), (2, "success")]
    assert final["attempts"][0]["error"]["type"] == "task_lost"
    # The status follows the latest attempt: its own run, one final event.
    assert sum(e["type"] == "serverless_api" for e in events) == 1
    assert any(e["type"] == "progress" for e in events)

    # A success is never run again: a sync retry answers it from the log.
    again = other.run(text_to_image(steps=STEPS, size=SIZE, seed=7), headers={"X-Task-Id": task_id})
    assert again.status_code == 200, again.text
    assert again.json()["data"]["attempt"] == 2 and again.json()["data"]["status"] == "success"
    assert other.status(task_id)[-1]["data"] == final


def test_sync_retry_after_crash_runs_again(tmp_path: Path, shared_log: Path, other: Server) -> None:
    victim = Server(tmp_path / "victim", task_log_dir=shared_log, lease_seconds=LEASE).wait_ready()
    task_id = "syncretry-" + uuid.uuid4().hex
    kill_mid_run(victim, other, task_id, 3000)
    assert other.wait_final(task_id, timeout=60)[-1]["data"]["error"]["type"] == "task_lost"
    r = other.run(image_only(), headers={"X-Task-Id": task_id})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "success" and r.json()["data"]["attempt"] == 2


def test_cancel_and_user_errors_never_run_again(other: Server) -> None:
    bad_id = "baduser-" + uuid.uuid4().hex
    bad = image_only()
    bad["1"]["inputs"]["width"] = "wide"
    first = other.run(bad, headers={"X-Task-Id": bad_id})
    assert first.status_code == 400
    # A refused request leaves nothing: a corrected one runs as attempt 1.
    ok = other.run(image_only(), headers={"X-Task-Id": bad_id})
    assert ok.status_code == 200 and ok.json()["data"]["attempt"] == 1

    task_id = "cancelled-" + uuid.uuid4().hex
    r = other.run(text_to_image(steps=3000, seed=2),
                  headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
    assert r.status_code == 202
    deadline = time.monotonic() + 60
    while not any(e["type"] == "progress" for e in other.status(task_id)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    requests.post(f"{other.url}/api/serverless/cancel", params={"task_id": task_id}, timeout=10)
    cancelled = other.wait_final(task_id)[-1]["data"]
    assert cancelled["error"]["type"] == "execution_interrupted"
    again = other.run(image_only(), headers={"X-Task-Id": task_id})
    assert again.status_code == 409, again.text
    assert again.json()["data"]["error"]["type"] == "execution_interrupted"
    assert again.json()["data"]["attempt"] == 1
