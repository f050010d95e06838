"""Tests for comfy_embed.service.attempts: who may run a lost task again, and
what its final event says, on a real task log (tmp_path)."""

from __future__ import annotations

from pathlib import Path

from comfy_embed.events import final_event
from comfy_embed.service.attempts import Attempts
from comfy_embed.tasklog.log import TaskLog
from tests.tasklog.test_log import FakeClock


def lost(tmp_path: Path, clock: FakeClock, key: str | None) -> None:
    dead = TaskLog(tmp_path, "dead", lease_seconds=4, clock=clock)
    assert dead.claim("t1")
    if key is not None:
        dead.set_key_hash("t1", key)
    clock.t += 10
    assert TaskLog(tmp_path, "closer", lease_seconds=4, clock=clock).recover_orphans() == ["t1"]


def test_only_the_key_that_created_it_runs_it_again(tmp_path: Path) -> None:
    clock = FakeClock()
    lost(tmp_path, clock, "hash-a")
    attempts = Attempts(TaskLog(tmp_path, "i", lease_seconds=4, clock=clock), max_attempts=3)
    assert not attempts.retry("t1", "hash-b")
    assert not attempts.retry("t1", None)  # keys off now, on then: not the same caller
    assert attempts.retry("t1", "hash-a")


def test_a_task_without_a_key_is_not_taken_by_a_keyed_caller(tmp_path: Path) -> None:
    clock = FakeClock()
    lost(tmp_path, clock, None)
    attempts = Attempts(TaskLog(tmp_path, "i", lease_seconds=4, clock=clock), max_attempts=3)
    assert not attempts.retry("t1", "hash-a")
    assert attempts.retry("t1", None)


def test_the_final_event_names_its_attempt(tmp_path: Path) -> None:
    clock = FakeClock()
    lost(tmp_path, clock, None)
    tasklog = TaskLog(tmp_path, "i", lease_seconds=4, clock=clock)
    attempts = Attempts(tasklog, max_attempts=3)
    assert attempts.retry("t1", None)
    attempts.claimed("t1")
    final = final_event("t1", "p", {})
    attempts.stamp("t1", final)
    data = final["data"]
    assert data["attempt"] == 2
    assert [(a["attempt"], a["status"]) for a in data["attempts"]] == [(1, "error"), (2, "success")]
    assert data["attempts"][0]["error"]["type"] == "task_lost"
    # A task never retried: attempt 1 and no list.
    fresh = final_event("t2", "p", {})
    attempts.stamp("t2", fresh)
    assert fresh["data"]["attempt"] == 1 and "attempts" not in fresh["data"]
