"""A task's own retention: the policy record, expires_at, and the sweep of
the expiry index (tasklog/retention.py) on a real task log."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_embed.events import final_event
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.expiry import (
    Policy,
    expires_at,
    expiry_index,
    read_policy,
    task_expires_at,
    write_policy,
)
from comfy_embed.tasklog.files import FINAL_FILE
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasklog.retention import sweep
from comfy_embed.tasklog.tombstone import Folders


def test_expires_at() -> None:
    assert expires_at(0.0, Policy(), 3600.0) == "1970-01-01T01:00:00Z"
    assert expires_at(0.0, Policy(10.0), 3600.0) == "1970-01-01T00:00:10Z"
    assert expires_at(0.0, Policy(7200.0), 3600.0) == "1970-01-01T01:00:00Z"  # never longer
    assert expires_at(0.5, Policy(None, "nothing"), 3600.0) == "1970-01-01T00:00:01Z"
    assert expires_at(0.0, Policy(), None) is None
    assert expires_at(0.0, Policy(5.0), None) == "1970-01-01T00:00:05Z"


def finished(tl: TaskLog, task_id: str, at: float) -> None:
    tl.append(task_id, final_event(task_id, None, {}, []))
    os.utime(tl.task_dir(task_id) / FINAL_FILE, (at, at))


def folders(tmp_path: Path) -> Folders:
    out, temp, inp = tmp_path / "output", tmp_path / "temp", tmp_path / "input"
    for d in (out, temp, inp):
        d.mkdir(exist_ok=True)
    return Folders(out.resolve(), temp.resolve(), inp.resolve())


def test_policy_record_round_trip(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path / "log", "me")
    tl.claim("a")
    tl.claim("b")
    write_policy(tl, "a", Policy(30.0, "all"), 100.0)
    write_policy(tl, "b", Policy(), 100.0)  # the default: no record
    assert read_policy(tl, "a") == Policy(30.0, "all")
    assert read_policy(tl, "b") == Policy()
    assert task_expires_at(tl, "a", 3600.0) is None  # still running
    finished(tl, "a", 1000.0)
    assert task_expires_at(tl, "a", 3600.0) == "1970-01-01T00:17:10Z"


def test_sweep_deletes_on_time_and_waits_for_the_end(tmp_path: Path) -> None:
    f = folders(tmp_path)
    tl = TaskLog(f.output / "serverless_api", "me", output_root=f.output)
    for task_id in ("due", "later", "running", "hooked"):
        tl.claim(task_id)
        (f.output / task_id).mkdir()
        (f.output / task_id / "x.png").write_bytes(b"x")
        write_policy(tl, task_id, Policy(5.0), 1000.0)
    finished(tl, "due", 1000.0)
    finished(tl, "later", 1003.0)
    DeliveryLog(tl).register("hooked", {"url": "http://hook"})
    finished(tl, "hooked", 1000.0)
    sweep(tl, f, 3600.0, now=1006.0)
    assert not tl.exists("due") and not (f.output / "due").exists()
    for kept in ("later", "running", "hooked"):
        assert tl.exists(kept) and (f.output / kept / "x.png").exists()
    sweep(tl, f, 3600.0, now=1008.5)
    assert not tl.exists("later")
    assert tl.exists("running") and tl.exists("hooked")  # not ended; webhook pending
    finished(tl, "running", 1010.0)
    sweep(tl, f, 3600.0, now=1016.0)
    assert not tl.exists("running")
    # Nothing left in the index but the task whose webhook is undelivered.
    assert [ids for _, ids in expiry_index(tl).older_than(10**9)] == [["hooked"]]


def test_sweep_keep_nothing_strips(tmp_path: Path) -> None:
    f = folders(tmp_path)
    tl = TaskLog(f.output / "serverless_api", "me", output_root=f.output)
    tl.claim("k")
    (f.output / "k").mkdir()
    (f.output / "k" / "x.png").write_bytes(b"pixels")
    write_policy(tl, "k", Policy(None, "nothing"), 1000.0)
    tl.append("k", final_event("k", None, {}, [{"node_id": "1", "index": 0, "output": {
        "comfy": {"filename": "x.png", "type": "output", "subfolder": "k", "dir": "."}}}]))
    sweep(tl, f, 3600.0)
    assert not (f.output / "k").exists()
    ((_, ev),) = tl.read("k")
    assert ev["data"]["kept"] == "nothing" and ev["data"]["results"][0]["output"]["size"] == 6
