"""Removing old task outputs and logs, so a long-lived instance does not
fill its disk. Only runs when a retention period is configured."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from .tasklog import DeliveryLog, TaskLog
from .workflow import valid_task_id

log = logging.getLogger(__name__)

__all__ = ["prune"]


def _old(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def prune(output_dir: Path, temp_dir: Path, tasklog: TaskLog, max_age_seconds: float,
          now: float | None = None) -> int:
    """Delete, when older than ``max_age_seconds``: per-task output folders
    (``<output>/<task_id>/``, which only comfy-embed writes), temp files, and
    task logs that have their final event (and no webhook still to deliver).
    Returns how many were removed."""
    cutoff = (time.time() if now is None else now) - max_age_seconds
    removed = 0
    log_root = tasklog.root.resolve()
    for d in (output_dir.iterdir() if output_dir.is_dir() else ()):
        if d.is_dir() and valid_task_id(d.name) and d.resolve() != log_root and _old(d, cutoff):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    for f in (temp_dir.iterdir() if temp_dir.is_dir() else ()):
        if f.is_file() and _old(f, cutoff):
            f.unlink(missing_ok=True)
            removed += 1
    deliveries = DeliveryLog(tasklog)
    for d in (log_root.iterdir() if log_root.is_dir() else ()):
        # A webhook still being retried keeps its task's log (its state lives there).
        if (d.is_dir() and valid_task_id(d.name) and _old(d, cutoff) and tasklog.is_final(d.name)
                and not deliveries.undelivered(d.name)):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    if removed:
        log.info("retention: removed %d old outputs and task logs", removed)
    return removed
