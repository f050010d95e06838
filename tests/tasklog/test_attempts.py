"""Tests for comfy_embed.tasklog.attempts: a lost attempt is set aside and
its id claimed again, once, on real files (tmp_path) and threads."""

from __future__ import annotations

import threading
from pathlib import Path

from comfy_embed.tasklog.attempts import is_lost
from comfy_embed.tasklog.log import TaskLog
from tests.tasklog.test_log import FakeClock, ev, final


def lost_task(tmp_path: Path, clock: FakeClock, task_id: str = "t1") -> TaskLog:
    """A task claimed by a dead instance and closed as lost by another."""
    dead = TaskLog(tmp_path, "dead", lease_seconds=4, clock=clock)
    assert dead.claim(task_id)
    dead.extend(task_id, [(1, ev(1)), (2, ev(2))])
    clock.t += 10
    other = TaskLog(tmp_path, "other", lease_seconds=4, clock=clock)
    assert other.recover_orphans() == [task_id]
    return other


def test_is_lost_only_for_lost_runs() -> None:
    def err(type_: str, **details: str) -> dict:
        return {"type": "serverless_api", "data": {"status": "error", "error": {
            "type": type_, "message": "m", "details": details}}}

    assert is_lost(err("task_lost")) and is_lost(err("not_accepting"))
    assert is_lost(err("execution_interrupted", interrupted_by="shutdown"))
    assert not is_lost(err("execution_interrupted"))  # the caller's cancel
    for other in ("execution_error", "out_of_memory", "invalid_prompt", "run_timeout"):
        assert not is_lost(err(other))
    assert not is_lost(final()) and not is_lost(None)


def test_lost_task_runs_again_as_attempt_2(tmp_path: Path) -> None:
    clock = FakeClock()
    log = lost_task(tmp_path, clock)
    lost = log.read("t1")[-1][1]
    assert lost["data"]["error"]["type"] == "task_lost" and lost["data"]["attempt"] == 1

    retry = TaskLog(tmp_path, "retry", lease_seconds=4, clock=clock)
    assert not retry.claim("t1")
    assert retry.retry("t1", max_attempts=3)
    assert retry.attempt("t1") == 2 and log.attempt("t1") == 2  # the record, from any instance
    assert retry.read("t1") == []  # the new attempt starts empty: streams follow it
    [earlier] = retry.earlier_attempts("t1")
    assert earlier["attempt"] == 1 and earlier["error"]["type"] == "task_lost"
    assert earlier["finished_at"].endswith("Z")

    retry.append("t1", final())
    assert retry.read("t1")[-1][1]["data"]["status"] == "success"
    assert not TaskLog(tmp_path, "x", lease_seconds=4, clock=clock).retry("t1", 3)  # success: never again
    assert not (tmp_path / "@attempts" / "t1").exists()


def test_attempts_are_bounded(tmp_path: Path) -> None:
    clock = FakeClock()
    lost_task(tmp_path, clock)
    for attempt in (2, 3):
        log = TaskLog(tmp_path, f"i{attempt}", lease_seconds=4, clock=clock)
        assert log.retry("t1", max_attempts=3) and log.attempt("t1") == attempt
        clock.t += 10  # this one dies too
        closer = TaskLog(tmp_path, "closer", lease_seconds=4, clock=clock)
        assert closer.recover_orphans() == ["t1"]
        assert closer.read("t1")[-1][1]["data"]["attempt"] == attempt
    assert not TaskLog(tmp_path, "i4", lease_seconds=4, clock=clock).retry("t1", max_attempts=3)
    summary = TaskLog(tmp_path, "r", lease_seconds=4, clock=clock).earlier_attempts("t1")
    assert [a["attempt"] for a in summary] == [1, 2]


def test_two_retries_together_run_it_once(tmp_path: Path) -> None:
    clock = FakeClock()
    lost_task(tmp_path, clock)
    logs = [TaskLog(tmp_path, f"r{i}", lease_seconds=4, clock=clock) for i in range(8)]
    won: list[int] = []
    barrier = threading.Barrier(len(logs))

    def go(i: int) -> None:
        barrier.wait()
        if logs[i].claim("t1") or logs[i].retry("t1", 5):
            won.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(logs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1
    assert logs[won[0]].attempt("t1") == 2
    assert [a["attempt"] for a in logs[0].earlier_attempts("t1")] == [1]


def test_refused_retry_restores_the_lost_attempt(tmp_path: Path) -> None:
    clock = FakeClock()
    lost_task(tmp_path, clock)
    log = TaskLog(tmp_path, "r", lease_seconds=4, clock=clock)
    assert log.retry("t1", 3)
    log.discard("t1")  # the engine refused the retry's body
    assert log.read("t1")[-1][1]["data"]["error"]["type"] == "task_lost"
    assert log.retry("t1", 3) and log.attempt("t1") == 2  # a corrected retry still runs it
