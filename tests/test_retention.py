"""Old outputs and finished logs go; recent ones, running tasks and files
comfy-embed did not write stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

from comfy_embed.events import final_event
from comfy_embed.retention import prune
from comfy_embed.tasklog import DeliveryLog, TaskLog


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_prune(tmp_path: Path) -> None:
    out, temp = tmp_path / "output", tmp_path / "temp"
    tl = TaskLog(out / "serverless_api", "me")
    for name in ("old", "new"):
        (out / name).mkdir(parents=True)
        (out / name / "img.png").write_bytes(b"x")
    (out / "user file.png").write_bytes(b"x")  # not a task folder
    temp.mkdir()
    (temp / "old.png").write_bytes(b"x")
    for task, final in (("done-old", True), ("running-old", False), ("done-new", True)):
        tl.claim(task)
        tl.append(task, {"type": "status", "data": {}})
        if final:
            tl.append(task, final_event(task, None, {}, []))
    for p in (out / "old", temp / "old.png", out / "user file.png",
              tl.root / "done-old", tl.root / "running-old"):
        age(p, 7200)
    age(tl.root, 7200)

    removed = prune(out, temp, tl, 3600)

    assert removed == 3
    assert not (out / "old").exists() and (out / "new" / "img.png").exists()
    assert (out / "user file.png").exists() and not (temp / "old.png").exists()
    assert tl.read("done-old") == [] and tl.read("running-old") and tl.read("done-new")
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
