"""The task log's indexes (comfy_embed/tasklog/index.py): the periodic scans of
every instance look only at the tasks they are about, not at every folder
kept for the retention period, and logs from before the index still get
their orphans closed and their webhooks resumed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.events import FINAL
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.index import INDEX_FOLDER, NameIndex
from comfy_embed.tasklog.log import TaskLog

from tests.tasklog.test_log import FakeClock, ev, final

HOOK = {"url": "http://127.0.0.1:9/hook", "events": "final"}


def looked_at(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task ids whose final event a scan checks."""
    seen: list[str] = []
    real = TaskLog.is_final
    monkeypatch.setattr(TaskLog, "is_final", lambda self, t: seen.append(t) or real(self, t))
    return seen


def test_recovery_looks_only_at_open_tasks_of_any_instance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    owner = TaskLog(tmp_path, "owner", lease_seconds=30, clock=clock)
    rescuer = TaskLog(tmp_path, "rescuer", lease_seconds=30, clock=clock)
    assert rescuer.recover_orphans(now=clock.t) == []  # a new log: its first scan
    for n in range(30):
        owner.claim(f"done-{n}")
        owner.extend(f"done-{n}", [(1, ev(1)), (2, final())])
    owner.claim("dead")
    owner.extend("dead", [(1, ev(1))])  # then its instance died
    owner.claim("live")
    assert NameIndex(tmp_path, "open").names() == ["dead", "live"]
    seen = looked_at(monkeypatch)
    clock.t += 40
    owner.renew(["live"])
    assert rescuer.recover_orphans(now=clock.t) == ["dead"]
    assert sorted(set(seen)) == ["dead", "live"]  # the 30 finished tasks were not looked at
    assert NameIndex(tmp_path, "open").names() == ["live"]  # closed: out of the index
    events = rescuer.read("dead")
    assert [e["type"] for _, e in events] == ["progress", FINAL]
    assert events[-1][1]["data"]["error"]["type"] == "task_lost"


def test_entries_left_by_a_crash_are_dropped_and_a_discard_drops_its_own(tmp_path: Path) -> None:
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    tl.recover_orphans(now=clock.t)
    index = NameIndex(tmp_path, "open")
    tl.claim("finished")
    tl.append("finished", final())
    index.add("finished")  # as if it crashed between the final and the drop
    index.add("pruned")  # its folder deleted (retention) with the entry left behind
    tl.claim("refused")
    tl.discard("refused")  # claimed, then the engine did not queue it
    assert index.names() == ["finished", "pruned"]
    assert tl.recover_orphans(now=clock.t + 60) == []
    assert index.names() == []


def test_a_log_from_before_the_index_is_scanned_once_and_indexed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    old = TaskLog(tmp_path, "old", lease_seconds=30, clock=clock)
    for task in ("dead", "live", "finished"):
        old.claim(task)
        old.append(task, ev(0))
    old.append("finished", final())
    shutil.rmtree(tmp_path / INDEX_FOLDER)  # written by a version without the index
    clock.t += 40
    old.renew(["live"])
    new = TaskLog(tmp_path, "new", lease_seconds=30, clock=clock)
    assert new.recover_orphans(now=clock.t) == ["dead"]  # the full scan finds it
    assert NameIndex(tmp_path, "open").complete()
    assert NameIndex(tmp_path, "open").names() == ["live"]  # indexed for the next scans
    seen = looked_at(monkeypatch)
    clock.t += 40  # "live" now expired too
    assert TaskLog(tmp_path, "third", clock=clock).recover_orphans(now=clock.t) == ["live"]
    assert "finished" not in seen


def test_webhook_index_names_only_undelivered_webhooks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    deliveries = DeliveryLog(tl)
    assert deliveries.pending() == []  # a new log: its first scan
    for n in range(20):  # finished, no webhook
        tl.claim(f"plain-{n}")
        tl.append(f"plain-{n}", final())
    for task in ("delivered", "waiting", "running"):
        tl.claim(task)
        assert deliveries.register(task, HOOK)
    for task in ("delivered", "waiting"):
        tl.append(task, final())
    deliveries.finish("delivered", {"status": "delivered"})
    index = NameIndex(tmp_path, "webhooks")
    assert index.names() == ["running", "waiting"]
    seen = looked_at(monkeypatch)
    assert deliveries.pending() == ["waiting"]  # final, webhook not done, nobody holds it
    assert sorted(set(seen)) == ["running", "waiting"]
    gen = deliveries.claim("waiting")
    assert gen is not None and deliveries.pending() == []  # held by a live lease


def test_webhooks_of_a_log_from_before_the_index_are_resumed(tmp_path: Path) -> None:
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    deliveries = DeliveryLog(tl)
    tl.claim("waiting")
    deliveries.register("waiting", HOOK)
    tl.append("waiting", final())
    shutil.rmtree(tmp_path / INDEX_FOLDER)
    fresh: Any = DeliveryLog(TaskLog(tmp_path, "i2", clock=clock))
    assert fresh.pending() == ["waiting"]
    assert fresh.index.complete() and fresh.index.names() == ["waiting"]
    assert fresh.pending() == ["waiting"]  # from the index now
