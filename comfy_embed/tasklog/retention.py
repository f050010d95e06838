"""Deleting old files the service made, so a long-lived instance does not
fill its disk (``COMFY_EMBED_RETENTION_HOURS``, default 24; 0/none: off).

Only what the service recorded goes: a task is known by its folder in the
task log, and only finished tasks older than the retention period are
pruned, each with its output folder (``<output>/<task_id>/``, which the
service never lets a task id share with an existing folder) and its
materialised inputs (``<input>/serverless/<task_id>/``). A user's own folder
in the output folder (``output/my_portraits``) has no task record and stays.
Temp files (ComfyUI's scratch folder, previews) go by age.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from comfy_embed.taskid import valid_task_id
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.expiry import (
    KEEP_NOTHING,
    expiry_index,
    finished_at,
    read_policy,
)
from comfy_embed.tasklog.index import BUCKET_SECONDS
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasklog.tombstone import (
    Folders,
    Removal,
    final_of,
    scrub,
    scrub_uploads,
    strip,
)

log = logging.getLogger(__name__)

__all__ = ["prune", "sweep"]

#: Where materialised inputs go, under the input folder (inputs.SUBFOLDER;
#: not imported, to keep this module free of the HTTP client).
_INPUT_SUBFOLDER = "serverless"


def _old(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _remove_tree(path: Path, root: Path) -> bool:
    """rmtree ``path`` if it is a real folder directly inside ``root`` (never
    a link to elsewhere)."""
    if path.parent != root or path.is_symlink() or not path.is_dir():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def prune(output_dir: Path, temp_dir: Path, tasklog: TaskLog, max_age_seconds: float,
          now: float | None = None, input_dir: Path | None = None,
          uploads: list[tuple[str, dict[str, Any]]] | None = None) -> int:
    """Delete, when older than ``max_age_seconds``: finished tasks that the
    task log records and whose webhook (if any) is delivered (their log,
    ``<output>/<task_id>/`` and ``<input>/serverless/<task_id>/``), and temp
    files. Returns how many tasks and temp files were removed.

    The task log's done index (index.py) names the tasks that finished
    long enough ago, so a log of many recent tasks costs a listing of its
    buckets, not a stat per folder every minute. A log from before the
    index is scanned in full once, which indexes the tasks it keeps.
    ``uploads``: where given, the object-storage entries of the removed
    tasks' results are added to it (for the caller to delete; one read of
    each removed task's final event)."""
    cutoff = (time.time() if now is None else now) - max_age_seconds
    removed = 0
    log_root = tasklog.root.resolve()
    output_dir = output_dir.resolve()
    inputs = input_dir.resolve() / _INPUT_SUBFOLDER if input_dir is not None else None
    deliveries = DeliveryLog(tasklog)

    def prune_task(task_id: str) -> bool | None:
        """True: removed; False: kept (too recent, running, webhook not
        delivered); None: not a task folder (gone, or never one)."""
        d = log_root / task_id
        if not (valid_task_id(task_id) and d.is_dir()):
            return None
        # A webhook still being retried keeps its task's log (its state lives there).
        if not (_old(d, cutoff) and tasklog.is_final(task_id)
                and not deliveries.undelivered(task_id)):
            return False
        if uploads is not None:
            found = Removal()
            scrub_uploads(final_of(tasklog, task_id), found)
            uploads.extend(found.objects)
        out = output_dir / task_id
        if out.resolve() != log_root:
            _remove_tree(out, output_dir)
        if inputs is not None:
            _remove_tree(inputs / task_id, inputs)
        _remove_tree(d, log_root)  # last: the record is what makes the rest ours
        return True

    done = tasklog.done_index
    if done.complete():
        for bucket, task_ids in done.older_than(cutoff):
            for task_id in task_ids:
                pruned = prune_task(task_id)
                removed += bool(pruned)
                if pruned is not False:  # removed, or no task there any more
                    (bucket / task_id).unlink(missing_ok=True)
            try:
                bucket.rmdir()
            except OSError:
                pass  # tasks kept for now (webhook not delivered) wait there
    else:
        for d in (sorted(log_root.iterdir()) if log_root.is_dir() else ()):
            pruned = prune_task(d.name)
            removed += bool(pruned)
            if pruned is False and tasklog.is_final(d.name):
                try:
                    done.add(d.name, d.stat().st_mtime)
                except FileNotFoundError:
                    continue
        done.mark_complete()
    # Files directly in <input>/serverless/ (a dry run's materialised inputs,
    # or from before per-task folders): only the service writes there.
    for f in (inputs.iterdir() if inputs is not None and inputs.is_dir() else ()):
        if f.is_file() and _old(f, cutoff):
            f.unlink(missing_ok=True)
            removed += 1
    for f in (temp_dir.iterdir() if temp_dir.is_dir() else ()):
        if f.is_file() and _old(f, cutoff):
            f.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("retention: removed %d finished tasks and temp files", removed)
    return removed


def sweep(tasklog: TaskLog, folders: Folders, retention_seconds: float | None,
          now: float | None = None) -> Removal:
    """Delete what the expiry index says is due (expiry.py): a task with a
    ``ttl`` of its own goes whole (log, outputs, inputs) at its end plus its
    ttl; a keep-nothing task's inputs and outputs go at its end
    (:func:`~comfy_embed.tasklog.tombstone.strip`), its log then following
    the operator's retention. Either waits for the task's final event and
    its webhook's outcome. Cheap when nothing is due: one listing of the
    index. Blocking (a worker thread); the objects the removed results
    uploaded are returned for the caller to delete."""
    now = time.time() if now is None else now
    index = expiry_index(tasklog)
    deliveries = DeliveryLog(tasklog)
    removal = Removal()
    # The current bucket too: each task's own time is checked below, so the
    # lag is the sweep's interval, not a bucket's width.
    for bucket, task_ids in index.older_than(now + BUCKET_SECONDS):
        for task_id in task_ids:
            entry = bucket / task_id
            if not (valid_task_id(task_id) and tasklog.exists(task_id)):
                entry.unlink(missing_ok=True)
                continue
            end = finished_at(tasklog, task_id)
            if end is None or deliveries.undelivered(task_id):
                continue  # looked at again on the next sweep
            policy = read_policy(tasklog, task_id)
            seconds = policy.seconds(retention_seconds)
            if seconds is None:
                entry.unlink(missing_ok=True)
                continue
            due = end + seconds
            if due > now:
                if int(due // BUCKET_SECONDS) != int(bucket.name):
                    index.add(task_id, due)
                    entry.unlink(missing_ok=True)
                continue
            try:
                if policy.keep == KEEP_NOTHING:
                    done = strip(tasklog, task_id, folders)
                else:
                    done = Removal()
                    _scrub_all(tasklog, task_id, folders, done)
            except (OSError, ValueError) as e:
                log.warning("retention: task %s: cannot delete it yet: %s", task_id, e)
                continue
            removal.files += done.files
            removal.bytes += done.bytes
            removal.objects.extend(done.objects)
            entry.unlink(missing_ok=True)
        try:
            bucket.rmdir()
        except OSError:
            pass  # tasks still running or undelivered wait there
    return removal


def _scrub_all(tasklog: TaskLog, task_id: str, folders: Folders, removal: Removal) -> None:
    """A ``ttl`` task at its expiry: outputs, inputs and its log folder."""
    scrub(tasklog, task_id, folders, final_of(tasklog, task_id), removal)
    log_root = tasklog.root.resolve()
    _remove_tree(tasklog.task_dir(task_id).resolve(), log_root)
