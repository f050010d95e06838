"""Tests for comfy_embed.tasklog.delivery: webhook delivery state kept as
records of the task log, on real files (tmp_path). The delivery loop that
drives it is tested in tests/webhooks/."""

from __future__ import annotations

import ast
import inspect
import json
import os
from pathlib import Path

from comfy_embed.tasklog import delivery
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.log import TaskLog

from tests.tasklog.test_log import FakeClock, final

HOOK = {"url": "http://127.0.0.1:9/hook", "id": "msg_1", "events": ["completed"]}


def test_delivery_files_on_disk(tmp_path: Path) -> None:
    """The names and contents other instances (and earlier versions) read."""
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    deliveries = DeliveryLog(tl)
    tl.claim("t")
    assert deliveries.register("t", HOOK) and not deliveries.register("t", {"url": "x"})
    assert deliveries.request("t") == HOOK
    assert deliveries.claim("t") == 1
    assert deliveries.begin_attempt("t", 1, {"at": 1.0})
    assert not deliveries.begin_attempt("t", 1, {"at": 2.0})  # attempt 1 goes out once
    deliveries.end_attempt("t", 1, {"status": 200, "outcome": "delivered"})
    assert deliveries.finish("t", {"state": "delivered"})
    d = tmp_path / "t"
    assert sorted(n for n in os.listdir(d) if n.startswith("webhook")) == [
        "webhook.done", "webhook.json", "webhook.lease.0001", "webhook.result.0001.json",
        "webhook.try.0001.json"]
    assert json.loads((d / "webhook.json").read_bytes()) == HOOK
    assert json.loads((d / "webhook.lease.0001").read_bytes()) == {
        "instance_id": "i1", "claimed_at": clock.t}
    assert os.stat(d / "webhook.lease.0001").st_mtime == clock.t
    assert tl.records("t", "webhook.") == sorted(n for n in os.listdir(d)
                                                 if n.startswith("webhook"))


def test_state_merges_attempts_with_their_results(tmp_path: Path) -> None:
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    deliveries = DeliveryLog(tl)
    tl.claim("t")
    assert deliveries.state("t") is None  # no webhook
    deliveries.register("t", HOOK)
    gen = deliveries.claim("t")
    assert gen == 1
    deliveries.begin_attempt("t", 1, {"at": 1.0, "instance_id": "i1"})
    deliveries.end_attempt("t", 1, {"status": 503, "outcome": "retry"})
    deliveries.begin_attempt("t", 2, {"at": 2.0, "instance_id": "i1"})  # still being sent
    assert deliveries.state("t") == {
        "request": HOOK,
        "attempts": [{"at": 1.0, "instance_id": "i1", "attempt": 1, "status": 503,
                      "outcome": "retry"},
                     {"at": 2.0, "instance_id": "i1", "attempt": 2}],
        "done": None,
        "lease": {"instance_id": "i1", "generation": 1, "renewed_at": clock.t}}


def test_renew_and_release_only_the_newest_generation(tmp_path: Path) -> None:
    clock = FakeClock()
    a = DeliveryLog(TaskLog(tmp_path, "a", lease_seconds=30, clock=clock))
    b = DeliveryLog(TaskLog(tmp_path, "b", lease_seconds=30, clock=clock))
    a.tasklog.claim("t")
    a.register("t", HOOK)
    a.tasklog.append("t", final())
    assert a.claim("t") == 1 and b.pending() == []
    clock.t += 20
    assert a.renew("t", 1)
    clock.t += 20
    assert b.pending() == [] and b.claim("t") is None  # renewed 20 s ago: still held
    a.release("t", 1)  # handed back: another instance resumes at once
    assert b.pending() == ["t"] and b.claim("t") == 2
    assert not a.holds("t", 1) and not a.renew("t", 1)
    a.release("t", 1)  # a stale holder's release frees nothing
    assert a.pending() == [] and a.claim("t") is None
    state = b.state("t")
    assert state is not None and state["lease"]["instance_id"] == "b"


def test_undelivered_and_a_missing_folder(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    deliveries = DeliveryLog(tl)
    assert not deliveries.undelivered("nope") and deliveries.state("nope") is None
    assert deliveries.request("nope") is None
    deliveries.register("t", HOOK)  # makes the task's folder, as a write would
    assert tl.exists("t") and deliveries.undelivered("t")
    deliveries.finish("t", {"state": "failed"})
    assert not deliveries.undelivered("t")


def test_delivery_log_uses_only_the_public_task_log() -> None:
    """DeliveryLog reads and writes through TaskLog's public methods (records,
    leases): nothing private of the task log, its module included."""
    tree = ast.parse(inspect.getsource(delivery))
    private = [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_")
               and not (isinstance(node.value, ast.Name) and node.value.id == "self")]
    assert not private, private
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for a in node.names}
    assert not {name for name in imported if name.startswith("_")}
