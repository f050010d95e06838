"""Deleting one task's data now (bury) and keeping nothing (strip), on a
real task log: files named by results, the task's folders, the log's
events and records go; a tombstone or the hashes stay; objects are handed
back to the caller."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from comfy_embed.events import final_event
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.expiry import Policy, write_policy
from comfy_embed.tasklog.files import decode
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasklog.tombstone import DELETED, OUTPUT_DELETED, Folders, bury, strip

PIXELS = b"\x89PNG-not-really-" + bytes(range(256))


def setup_task(tmp_path: Path, task_id: str = "t1") -> tuple[TaskLog, Folders]:
    out, temp, inp = tmp_path / "output", tmp_path / "temp", tmp_path / "input"
    for d in (out / task_id, temp, inp / "serverless" / task_id):
        d.mkdir(parents=True)
    (out / task_id / "img_00001_.png").write_bytes(PIXELS)
    (temp / "preview_00001_.png").write_bytes(PIXELS[::-1])
    (inp / "serverless" / task_id / "abc.png").write_bytes(b"input bytes")
    (out / "user.png").write_bytes(b"not the task's")
    tl = TaskLog(out / "serverless_api", "me", output_root=out)
    tl.claim(task_id)
    tl.set_key_hash(task_id, "hash-of-key")
    tl.append(task_id, {"type": "executing", "data": {"node": "3"}})
    results = [
        {"node_id": "3", "index": 0, "output": {
            "comfy": {"filename": "img_00001_.png", "type": "output", "subfolder": task_id,
                      "dir": "."},
            "media_type": "image/png",
            "base64": {"data": base64.b64encode(PIXELS).decode()},
            "s3": {"bucket": "b", "object": "k/1.png", "url": "http://x/k/1.png"}}},
        {"node_id": "4", "index": 0, "output": {
            "comfy": {"filename": "preview_00001_.png", "type": "temp", "subfolder": "",
                      "dir": "../temp"}, "media_type": "image/png"}},
        # A result naming a file outside the output and temp folders is never touched.
        {"node_id": "5", "index": 0, "output": {
            "comfy": {"filename": "passwd", "type": "output", "subfolder": "", "dir": "../../etc"}}},
    ]
    tl.append(task_id, final_event(task_id, "p1", {"2": 7}, results))
    return tl, Folders(out.resolve(), temp.resolve(), inp.resolve())


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_bury_leaves_only_a_tombstone(tmp_path: Path) -> None:
    tl, folders = setup_task(tmp_path)
    DeliveryLog(tl).register("t1", {"url": "http://hook"})
    removal = bury(tl, "t1", folders, now=1_000.0)
    assert removal.objects == [("s3", {"bucket": "b", "object": "k/1.png",
                                       "url": "http://x/k/1.png"})]
    assert not (folders.output / "t1").exists()
    assert not (folders.input / "serverless" / "t1").exists()
    assert not (folders.temp / "preview_00001_.png").exists()
    assert (folders.output / "user.png").exists()
    assert sorted(p.name for p in tl.task_dir("t1").iterdir()) == ["erased", "final", "owner_key"]
    assert tl.key_hash("t1") == "hash-of-key"
    assert "t1" not in DeliveryLog(tl).pending()
    ((_, ev),) = tl.read("t1")
    assert ev["data"]["error"]["type"] == DELETED
    assert ev["data"]["deleted"]["status"] == "success"
    assert ev["data"]["deleted"]["deleted_at"] == "1970-01-01T00:16:40Z"
    assert ev["data"]["results"] == [] and ev["data"]["seeds"] == {}
    # Twice: nothing more.
    again = bury(tl, "t1", folders)
    assert again.files == 0 and again.objects == []
    # Kept for the retention period from the deletion.
    assert [ids for _, ids in tl.done_index.older_than(1_020.0)] == [["t1"]]


def test_records_in_the_final_go_with_bury_and_strip(tmp_path: Path) -> None:
    out = tmp_path / "output"
    folders = Folders(out.resolve(), (tmp_path / "temp").resolve())
    tl = TaskLog(out / "serverless_api", "me", output_root=out)
    for task_id in ("buried", "stripped"):
        tl.claim(task_id)
        tl.extend(task_id, [(None, final_event(task_id, "p", {}, []))],
                  {"replay.json": b'{"graph":{"1":{"inputs":{"text":"a secret prompt"}}}}'})
        assert "secret" in json.dumps(decode((tl.task_dir(task_id) / "final").read_bytes()))
    bury(tl, "buried", folders)
    strip(tl, "stripped", folders)
    for task_id in ("buried", "stripped"):
        assert tl.final_record(task_id, "replay.json") is None
        assert "secret" not in json.dumps(decode((tl.task_dir(task_id) / "final").read_bytes()))


def test_bury_refuses_a_running_or_unknown_task(tmp_path: Path) -> None:
    tl, folders = setup_task(tmp_path)
    tl.claim("running")
    with pytest.raises(ValueError, match="has not ended"):
        bury(tl, "running", folders)
    with pytest.raises(FileNotFoundError):
        bury(tl, "never", folders)


def test_strip_keeps_hashes_and_sizes(tmp_path: Path) -> None:
    tl, folders = setup_task(tmp_path)
    write_policy(tl, "t1", Policy(None, "nothing"), 0.0)
    removal = strip(tl, "t1", folders)
    assert ("s3", {"bucket": "b", "object": "k/1.png", "url": "http://x/k/1.png"}) in \
        removal.objects
    assert not (folders.output / "t1").exists()
    assert not (folders.temp / "preview_00001_.png").exists()
    ((_, ev),) = tl.read("t1")
    data = ev["data"]
    assert data["status"] == "success" and data["kept"] == "nothing"
    first = data["results"][0]["output"]
    assert first == {"media_type": "image/png", "sha256": hashlib.sha256(PIXELS).hexdigest(),
                     "size": len(PIXELS), "error": first["error"]}
    assert first["error"]["type"] == OUTPUT_DELETED
    assert data["results"][1]["output"]["sha256"] == hashlib.sha256(PIXELS[::-1]).hexdigest()
    assert data["inputs"] == [{"sha256": hashlib.sha256(b"input bytes").hexdigest(),
                               "size": len(b"input bytes")}]
    # No byte of the output left in the log folder.
    for p in tl.task_dir("t1").iterdir():
        assert PIXELS not in p.read_bytes()
    assert strip(tl, "t1", folders).files == 0  # idempotent
