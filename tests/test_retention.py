"""Retention deletes only what the service recorded: old finished tasks (log,
output folder, materialised inputs) and old temp files; recent tasks,
running tasks and folders no task recorded (a user's own) stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

from comfy_embed.config import Settings
from comfy_embed.events import final_event
from comfy_embed.retention import prune
from comfy_embed.tasklog import DeliveryLog, TaskLog


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
    assert Settings().retention_hours == 24.0
    for off in ("0", "none", "None", "off"):
        hours = Settings.from_env({"COMFY_EMBED_RETENTION_HOURS": off}).retention_hours
        assert not hours
    assert Settings.from_env({"COMFY_EMBED_RETENTION_HOURS": "1.5"}).retention_hours == 1.5
