"""Retention deletes only what the service recorded: old finished tasks (log,
output folder, materialised inputs) and old temp files; recent tasks,
running tasks and folders no task recorded (a user's own) stay."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from comfy_embed.config import Settings
from comfy_embed.events import final_event
from comfy_embed.tasklog.index import BUCKET_SECONDS, INDEX_FOLDER
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasklog.retention import prune


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_prune(tmp_path: Path) -> None:
    out, temp, inp = tmp_path / "output", tmp_path / "temp", tmp_path / "input"
    tl = TaskLog(out / "serverless_api", "me")
    for name in ("done-old", "done-new", "running-old", "my_portraits"):
        (out / name).mkdir(parents=True)
        (out / name / "img.png").write_bytes(b"x")
        (inp / "serverless" / name).mkdir(parents=True)
        (inp / "serverless" / name / "in.png").write_bytes(b"x")
    (out / "user file.png").write_bytes(b"x")  # not a task folder
    temp.mkdir()
    (temp / "old.png").write_bytes(b"x")
    for task, final in (("done-old", True), ("running-old", False), ("done-new", True)):
        tl.claim(task)
        tl.append(task, {"type": "status", "data": {}})
        if final:
            tl.append(task, final_event(task, None, {}, []))
    for p in (out / "done-old", out / "my_portraits", temp / "old.png", out / "user file.png",
              tl.root / "done-old", tl.root / "running-old"):
        age(p, 7200)
    age(tl.root, 7200)

    removed = prune(out, temp, tl, 3600, input_dir=inp)

    assert removed == 2  # the finished old task and the old temp file
    assert not (out / "done-old").exists() and not (inp / "serverless" / "done-old").exists()
    assert tl.read("done-old") == [] and not (tl.root / "done-old").exists()
    # Recent, running and unrecorded folders stay, however old.
    assert (out / "done-new" / "img.png").exists() and tl.read("done-new")
    assert (out / "running-old" / "img.png").exists() and tl.read("running-old")
    assert (out / "my_portraits" / "img.png").exists()
    assert (inp / "serverless" / "my_portraits" / "in.png").exists()
    assert (out / "user file.png").exists() and not (temp / "old.png").exists()
    assert (out / "serverless_api").is_dir()


def test_prune_keeps_a_task_log_whose_webhook_is_not_delivered(tmp_path: Path) -> None:
    out, temp = tmp_path / "output", tmp_path / "temp"
    tl = TaskLog(out / "serverless_api", "me")
    deliveries = DeliveryLog(tl)
    for task in ("hook-pending", "hook-done"):
        tl.claim(task)
        deliveries.register(task, {"url": "http://x", "id": "msg_" + task})
        tl.append(task, final_event(task, None, {}, []))
    deliveries.finish("hook-done", {"state": "delivered"})
    for task in ("hook-pending", "hook-done"):
        age(tl.root / task, 7200)

    assert prune(out, temp, tl, 3600) == 1
    assert tl.read("hook-pending") and deliveries.undelivered("hook-pending")
    assert tl.read("hook-done") == []


def test_retention_setting_defaults_and_off() -> None:
    assert Settings().tasklog.retention_hours == 24.0
    for off in ("0", "none", "None", "off"):
        hours = Settings.from_env({"COMFY_EMBED_RETENTION_HOURS": off}).tasklog.retention_hours
        assert not hours
    assert Settings.from_env({"COMFY_EMBED_RETENTION_HOURS": "1.5"}).tasklog.retention_hours == 1.5


def test_prune_looks_only_at_tasks_that_finished_long_enough_ago(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The done index (logindex.py): a log of many recent tasks costs a
    listing of its time buckets, not a stat per folder; a task kept because
    its webhook is not delivered stays indexed and is looked at again."""
    out, temp = tmp_path / "output", tmp_path / "temp"
    root = out / "serverless_api"
    then = {"t": time.time() - 7200}
    two_hours_ago = TaskLog(root, "me", clock=lambda: then["t"])
    assert prune(out, temp, two_hours_ago, 3600) == 0  # a new log: its one full scan
    deliveries = DeliveryLog(two_hours_ago)
    for task in ("old-1", "old-2", "old-hook"):
        two_hours_ago.claim(task)
        if task == "old-hook":
            deliveries.register(task, {"url": "http://x", "id": "msg"})
        two_hours_ago.append(task, final_event(task, None, {}, []))
        age(root / task, 7200)
    recent = TaskLog(root, "me")
    for n in range(20):
        recent.claim(f"new-{n}")
        recent.append(f"new-{n}", final_event(f"new-{n}", None, {}, []))
    looked: list[str] = []
    real = TaskLog.is_final
    monkeypatch.setattr(TaskLog, "is_final", lambda self, t: looked.append(t) or real(self, t))

    assert prune(out, temp, recent, 3600) == 2
    assert sorted(set(looked)) == ["old-1", "old-2", "old-hook"]  # none of the 20 recent ones
    assert not (root / "old-1").exists() and (root / "old-hook").is_dir()
    assert all((root / f"new-{n}").is_dir() for n in range(20))
    looked.clear()
    deliveries.finish("old-hook", {"state": "delivered"})
    age(root / "old-hook", 7200)
    assert prune(out, temp, recent, 3600) == 1 and looked == ["old-hook"]
    assert [p.name for p in recent.done_index.folder.iterdir() if p.name != ".complete"] == [
        str(int(time.time() // BUCKET_SECONDS))]  # only the recent tasks' bucket is left


def test_a_log_from_before_the_done_index_is_scanned_once(tmp_path: Path) -> None:
    out, temp = tmp_path / "output", tmp_path / "temp"
    tl = TaskLog(out / "serverless_api", "me")
    for task in ("old", "young"):
        tl.claim(task)
        tl.append(task, final_event(task, None, {}, []))
    shutil.rmtree(tl.root / INDEX_FOLDER)  # written by a version without the index
    age(tl.root / "old", 7200)
    assert prune(out, temp, tl, 3600) == 1  # the full scan
    assert tl.done_index.complete() and not (tl.root / "old").exists()
    # "young" is indexed by its folder's time: found once it is old enough.
    assert prune(out, temp, tl, 3600, now=time.time() + 3600 + 2 * BUCKET_SECONDS) == 1
    assert not (tl.root / "young").exists()


def test_prune_hands_back_the_uploads_of_removed_tasks(tmp_path: Path) -> None:
    out, temp = tmp_path / "output", tmp_path / "temp"
    temp.mkdir(parents=True)
    tl = TaskLog(out / "serverless_api", "me")
    upload = {"bucket": "b", "object": "serverless-api-output/1.png", "url": "http://x"}
    for task_id, results in (("old", [{"node_id": "1", "index": 0, "output": {"s3": upload}}]),
                             ("fresh", [{"node_id": "1", "index": 0, "output": {"oss": upload}}])):
        tl.claim(task_id)
        tl.append(task_id, final_event(task_id, None, {}, results))
    # "old" finished two hours ago: its folder and its done-index entry say so.
    age(tl.task_dir("old"), 7200)
    for bucket in tl.done_index.folder.iterdir():
        (bucket / "old").unlink(missing_ok=True)
    tl.done_index.add("old", time.time() - 7200)
    uploads: list[tuple[str, dict[str, object]]] = []
    assert prune(out, temp, tl, 3600, uploads=uploads) == 1
    assert uploads == [("s3", upload)]
    assert not tl.exists("old") and tl.exists("fresh")
