"""Deleting one task's data now: everything but a tombstone (issue 29).

:func:`bury` (``DELETE /task``, or a ``?ttl=`` task at its expiry when
asked to leave a tombstone) removes the task's inputs
(``<input>/serverless/<task_id>/``), its outputs (``<output>/<task_id>/``
and every file its results name in the output or temp folder), and every
file of its log folder but the owner-key hash; its ``final`` becomes the
tombstone, a final event whose error is ``task_deleted`` and whose
``deleted`` says when it was created, finished and deleted, and how it had
ended. A status then answers "deleted", and a retry with the same id is
answered from it instead of running again (the folder still claims the id).

:func:`strip` (keep nothing) removes the inputs and outputs the same way
but keeps the final event, each result's output replaced by its SHA-256 and
size (and the inputs' too), with an ``output_deleted`` error where the data
was. Both return the object-storage entries the results uploaded, for the
caller to delete where the operator allows it (no SDK here).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_embed.events import FINAL, final_event
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.expiry import RECORD, iso
from comfy_embed.tasklog.files import FINAL_FILE, KEY, encode, fsync_dir, read_final
from comfy_embed.tasklog.index import BUCKET_SECONDS
from comfy_embed.tasklog.log import TaskLog

__all__ = [
    "DELETED",
    "ERASED",
    "OUTPUT_DELETED",
    "Folders",
    "Removal",
    "bury",
    "erased",
    "final_of",
    "scrub",
    "scrub_uploads",
    "strip",
]

log = logging.getLogger(__name__)

#: The error type of a tombstone's final event.
DELETED = "task_deleted"
#: The error type in place of a deleted output's data (keep nothing).
OUTPUT_DELETED = "output_deleted"
#: The record of a task whose data was deleted (buried or stripped): an
#: instance holding the finished task in memory answers from the log then.
#: Its exclusive creation also lets one instance alone strip a task.
ERASED = "erased"
#: Where materialised inputs go, under the input folder (as retention.py).
_INPUT_SUBFOLDER = "serverless"


@dataclass(frozen=True)
class Folders:
    """The folders a task's files lie in (resolved by the caller)."""

    output: Path
    temp: Path
    input: Path | None = None


@dataclass
class Removal:
    """What one deletion did: local files and bytes removed, and the object
    storage entries (``(backend, {"bucket", "object", ...})``) left to the
    caller."""

    files: int = 0
    bytes: int = 0
    objects: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _inside(path: Path, root: Path) -> bool:
    return path != root and root in path.parents


def _unlink(path: Path, removal: Removal) -> None:
    try:
        size = path.lstat().st_size
        path.unlink()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return
    removal.files += 1
    removal.bytes += size


def _remove_tree(path: Path, root: Path, removal: Removal) -> None:
    """Every file under ``path``, a real folder directly in ``root``."""
    if path.parent != root or path.is_symlink() or not path.is_dir():
        return
    for dirpath, _, names in os.walk(path):
        for name in names:
            _unlink(Path(dirpath) / name, removal)
    shutil.rmtree(path, ignore_errors=True)


def _result_file(comfy: Any, folders: Folders) -> Path | None:
    """The local file a result's ``output.comfy`` names, if it lies in the
    output or temp folder (anything else is never touched)."""
    if not isinstance(comfy, dict):
        return None
    try:
        path = Path(os.path.normpath(os.path.join(
            folders.output, str(comfy["dir"]), str(comfy["subfolder"]), str(comfy["filename"]))))
    except (KeyError, TypeError, ValueError):
        return None
    if path.is_symlink():
        return None
    return path if _inside(path, folders.output) or _inside(path, folders.temp) else None


def _results(event: dict[str, Any] | None) -> list[dict[str, Any]]:
    data = (event or {}).get("data")
    results = data.get("results") if isinstance(data, dict) else None
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def _objects(out: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A result's uploads: every entry with a bucket and an object key."""
    return [(k, v) for k, v in out.items()
            if isinstance(v, dict) and isinstance(v.get("bucket"), str)
            and isinstance(v.get("object"), str)]


def scrub_uploads(event: dict[str, Any] | None, removal: Removal) -> None:
    """Add the uploads a final ``event``'s results name to ``removal.objects``."""
    for r in _results(event):
        out = r.get("output")
        if isinstance(out, dict):
            removal.objects.extend(_objects(out))


def _digest(raw: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}


def scrub(tasklog: TaskLog, task_id: str, folders: Folders, event: dict[str, Any] | None,
           removal: Removal) -> None:
    """Remove the task's inputs and outputs (not its log): the files its
    final ``event``'s results name, its output and input folders; the
    results' uploads are added to ``removal.objects``."""
    for r in _results(event):
        out = r.get("output")
        if isinstance(out, dict):
            path = _result_file(out.get("comfy"), folders)
            if path is not None:
                _unlink(path, removal)
            removal.objects.extend(_objects(out))
    _remove_tree(folders.output / task_id, folders.output, removal)
    if folders.input is not None:
        inputs = folders.input / _INPUT_SUBFOLDER
        _remove_tree(inputs / task_id, inputs, removal)


def _clear_log(tasklog: TaskLog, task_id: str, keep: set[str], removal: Removal) -> None:
    """Every file of the task's log folder but ``keep``, and its index entries."""
    d = tasklog.task_dir(task_id)
    for name in sorted(os.listdir(d)):
        if name not in keep:
            path = d / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                _unlink(path, removal)
    tasklog.open_index.drop(task_id)
    DeliveryLog(tasklog).index.drop(task_id)


def _replace_final(tasklog: TaskLog, task_id: str, seq: int, event: dict[str, Any]) -> None:
    """Put ``event`` in the place of the task's final, alone (fsynced)."""
    d = tasklog.task_dir(task_id)
    tmp = d / f".tmp-final-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(encode({"seq": seq, "event": event, "blob": None, "from": seq, "events": []}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / FINAL_FILE)
    fsync_dir(d)


def _times(d: Path) -> tuple[float | None, float | None]:
    """(created, finished): the oldest file of the folder, the final's time."""
    created = finished = None
    for entry in os.scandir(d):
        try:
            t = entry.stat().st_mtime
        except FileNotFoundError:
            continue
        created = t if created is None else min(created, t)
        if entry.name == FINAL_FILE:
            finished = t
    return created, finished


def erased(tasklog: TaskLog, task_id: str) -> bool:
    """Whether the task's data was deleted (:func:`bury` or :func:`strip`)."""
    return tasklog.has_record(task_id, ERASED)


def final_of(tasklog: TaskLog, task_id: str, stored: dict[str, Any] | None = None
             ) -> dict[str, Any] | None:
    """The task's final event as stored (base64 data left out), or None."""
    if stored is None:
        marker = read_final(tasklog.task_dir(task_id))
        stored = marker.event if marker is not None else None
    if stored is None:  # an earlier version's log: the final event is in a segment
        events = tasklog.read(task_id)
        stored = events[-1][1] if events and events[-1][1].get("type") == FINAL else None
    return stored


def bury(tasklog: TaskLog, task_id: str, folders: Folders, now: float | None = None
         ) -> Removal:
    """Delete a finished task's data, leaving its tombstone (see the module
    doc). ValueError if the task has no final event (cancel it first);
    FileNotFoundError if it is unknown. Blocking: call from a worker thread.
    Deleting a tombstone again removes nothing more."""
    now = time.time() if now is None else now
    d = tasklog.task_dir(task_id)
    marker = read_final(d)
    if marker is None:
        if not d.is_dir():
            raise FileNotFoundError(task_id)
        raise ValueError(f"task {task_id} has not ended")
    event = final_of(tasklog, task_id, marker.event)
    data = (event or {}).get("data") or {}
    removal = Removal()
    error = data.get("error") if isinstance(data.get("error"), dict) else None
    if error is not None and error.get("type") == DELETED:
        return removal  # already a tombstone
    created, finished = _times(d)
    tasklog.put_record(task_id, ERASED, b"")
    scrub(tasklog, task_id, folders, event, removal)
    tomb = final_event(task_id, data.get("prompt_id"), {}, error={
        "type": DELETED, "node_errors": {},
        "message": f"task {task_id} was deleted: its inputs, outputs and events are gone"})
    tomb["data"]["deleted"] = {
        "status": data.get("status"), "error_type": (error or {}).get("type"),
        "created_at": iso(created), "finished_at": iso(finished), "deleted_at": iso(now)}
    _replace_final(tasklog, task_id, marker.seq, tomb)
    _clear_log(tasklog, task_id, {KEY, FINAL_FILE, ERASED}, removal)
    # Retention keeps the tombstone for its period from now: move its entry.
    if finished is not None:
        old = tasklog.done_index.folder / str(int(finished // BUCKET_SECONDS)) / task_id
        old.unlink(missing_ok=True)
    tasklog.done_index.add(task_id, now)
    log.info("task %s deleted: %d files, %d bytes", task_id, removal.files, removal.bytes)
    return removal


def _input_digests(folders: Folders, task_id: str) -> list[dict[str, Any]]:
    if folders.input is None:
        return []
    found = []
    for path in sorted((folders.input / _INPUT_SUBFOLDER / task_id).glob("**/*")):
        if path.is_file() and not path.is_symlink():
            try:
                found.append(_digest(path.read_bytes()))
            except OSError:
                continue
    return found


def _stripped(result: dict[str, Any], folders: Folders) -> dict[str, Any]:
    """A result with its output's data replaced by its hash and size."""
    out = result.get("output")
    if not isinstance(out, dict):
        return result
    raw = None
    path = _result_file(out.get("comfy"), folders)
    try:
        raw = path.read_bytes() if path is not None else None
    except OSError:
        raw = None
    b64 = out.get("base64")
    if raw is None and isinstance(b64, dict) and isinstance(b64.get("data"), str):
        raw = base64.b64decode(b64["data"])
    kept: dict[str, Any] = {"media_type": out.get("media_type")} if "media_type" in out else {}
    if raw is not None:
        kept.update(_digest(raw))
    kept["error"] = {"type": OUTPUT_DELETED,
                     "message": "this task kept nothing: its output was deleted once the "
                                "answer was delivered (its SHA-256 and size are kept)"}
    return {k: v for k, v in result.items() if k != "output"} | {"output": kept}


def strip(tasklog: TaskLog, task_id: str, folders: Folders) -> Removal:
    """Keep nothing: delete a finished task's inputs, outputs and event
    payloads, its final event keeping each output's (and input's) SHA-256
    and size. Blocking; ValueError if it has not ended. Idempotent."""
    events = tasklog.read(task_id)
    if not events or events[-1][1].get("type") != FINAL:
        raise ValueError(f"task {task_id} has not ended")
    seq, event = events[-1]
    data = dict(event.get("data") or {})
    removal = Removal()
    # One instance strips it: two at once would hash files the other deleted.
    if data.get("kept") == "nothing" or not tasklog.put_record(task_id, ERASED, b""):
        return removal
    data["results"] = [_stripped(r, folders) for r in _results(event)]
    data["inputs"] = _input_digests(folders, task_id)
    data["outputs"] = {}  # nodes' text and numbers are the caller's data too
    data["kept"] = "nothing"
    scrub(tasklog, task_id, folders, event, removal)
    _replace_final(tasklog, task_id, seq, {**event, "data": data})
    _clear_log(tasklog, task_id, {KEY, FINAL_FILE, RECORD, ERASED}, removal)
    return removal
