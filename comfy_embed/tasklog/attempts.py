"""Attempts: a task whose last attempt ended lost runs again under its id.

A task's folder holds its latest attempt. When a retry of a task whose
final event says it was lost (its lease expired, the instance shut down or
recycled before it ended) wins the exclusive ``retry`` record in that
folder, the folder is renamed to ``@attempts/<task_id>/<n>`` and the id is
claimed again; whoever claims it (the retry, or a request that slipped in
between) moves the earlier attempts into the new folder as
``attempt-<n>/``, so retention and deletion take them with the task, and
the new attempt's number is one more than the last kept.

A success, a cancel, a user error or any other failure is never run again.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from comfy_embed.tasklog.files import FINAL_FILE, listdir, publish, read_final

__all__ = [
    "ATTEMPT_RECORD",
    "RETRY_RECORD",
    "adopt",
    "archive",
    "attempt_of",
    "is_lost",
    "restore",
    "summaries",
]

#: The record (in a task's folder) with its attempt number, when above 1.
ATTEMPT_RECORD = "attempt"
#: The exclusive record of the one retry that reruns a lost attempt.
RETRY_RECORD = "retry"
#: Where a lost attempt's folder waits for the next claim (beside the tasks;
#: not a task id: ``@`` is not allowed in one).
STAGING = "@attempts"
_PREFIX = "attempt-"
#: Records of the task itself that every attempt keeps: a Comfy API v2 job
#: (service/jobs.py; named here to keep the log free of the service).
_TASK_RECORDS = ("v2job",)

#: Final error types that mean the run was lost, not that it failed:
#: ``task_lost`` (lease expired), ``not_accepting`` (closed by a shutdown
#: before it could run or finish).
_LOST_TYPES = frozenset({"task_lost", "not_accepting"})


def is_lost(final: dict[str, Any] | None) -> bool:
    """Whether a final event ends an attempt that was lost (to be run again
    on retry), rather than one that succeeded, was cancelled or failed."""
    error = ((final or {}).get("data") or {}).get("error")
    if not isinstance(error, dict):
        return False
    if error.get("type") in _LOST_TYPES:
        return True
    # Interrupted by a drain past its grace (SIGTERM, memory recycle): a
    # cancel the caller never asked for (tasks.py marks it).
    details = error.get("details")
    return (error.get("type") == "execution_interrupted" and isinstance(details, dict)
            and details.get("interrupted_by") == "shutdown")


def attempt_of(task_dir: Path) -> int:
    """The attempt number of the attempt in ``task_dir`` (1 without a record)."""
    try:
        return max(1, int((task_dir / ATTEMPT_RECORD).read_text("ascii")))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return 1


def archive(root: Path, task_id: str, max_attempts: int) -> bool:
    """Set aside the lost last attempt of ``task_id`` so that its id can be
    claimed again: True when this call did (the caller then claims it).
    False when the task is not lost, has had ``max_attempts``, or another
    retry is taking it (that one runs it; this one follows it)."""
    d = root / task_id
    final = read_final(d)
    if final is None or not is_lost(final.event):
        return False
    n = attempt_of(d)
    if n >= max_attempts:
        return False
    try:
        if not publish(d, RETRY_RECORD, str(n + 1).encode("ascii"), durable=True):
            return False  # another retry won
    except FileNotFoundError:
        return False
    again = read_final(d)
    if again is None or not is_lost(again.event) or attempt_of(d) != n:
        # Another retry set the lost attempt aside between our read and our
        # record, and claimed the id afresh: this record is in its new folder.
        (d / RETRY_RECORD).unlink(missing_ok=True)
        return False
    staging = root / STAGING / task_id
    staging.mkdir(parents=True, exist_ok=True)
    for k in _numbers(d):  # the earlier ones, side by side with this one
        os.rename(d / f"{_PREFIX}{k}", staging / str(k))
    os.rename(d, staging / str(n))
    return True


def _numbers(task_dir: Path) -> list[int]:
    """The numbers of the earlier attempts kept in a task's folder, sorted."""
    return sorted(int(n[len(_PREFIX):]) for n in listdir(task_dir)
                  if n.startswith(_PREFIX) and n[len(_PREFIX):].isdigit())


def adopt(root: Path, task_id: str) -> int:
    """Move the earlier attempts of ``task_id`` (set aside by :func:`archive`)
    into its freshly claimed folder; the new attempt's number (1 if none).
    One stat when there are none (the common case)."""
    staging = root / STAGING / task_id
    try:
        names = os.listdir(staging)
    except FileNotFoundError:
        return 1
    d = root / task_id
    for name in names:
        if name.isdigit():
            os.rename(staging / name, d / f"{_PREFIX}{name}")
    last = max(_numbers(d), default=0)
    for name in _TASK_RECORDS:  # what describes the task, not one attempt
        try:
            shutil.copyfile(d / f"{_PREFIX}{last}" / name, d / name)
        except FileNotFoundError:
            pass
    try:
        staging.rmdir()
    except OSError:
        pass  # another attempt set aside meanwhile: the next claim takes it
    attempt = last + 1
    if attempt > 1:
        publish(d, ATTEMPT_RECORD, str(attempt).encode("ascii"), durable=True)
    return attempt


def restore(root: Path, task_id: str) -> None:
    """Undo a retry's claim that was never accepted (a bad body, a full
    queue): the last lost attempt is the task's folder again, with the
    earlier ones inside it, and another retry may run it."""
    d = root / task_id
    numbers = _numbers(d)
    if not numbers:
        return
    last = d / f"{_PREFIX}{numbers[-1]}"
    for n in numbers[:-1]:
        os.rename(d / f"{_PREFIX}{n}", last / f"{_PREFIX}{n}")
    aside = root / STAGING / f".{task_id}.{os.getpid()}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.rename(d, aside)
    os.rename(aside / last.name, d)
    (d / RETRY_RECORD).unlink(missing_ok=True)
    shutil.rmtree(aside, ignore_errors=True)


def summaries(task_dir: Path) -> list[dict[str, Any]]:
    """The earlier attempts kept in a task's folder, oldest first: each
    ``{"attempt", "status", "error": {"type", "message"} | None,
    "finished_at"}`` (ISO 8601 UTC)."""
    out: list[dict[str, Any]] = []
    for n in _numbers(task_dir):
        folder = task_dir / f"{_PREFIX}{n}"
        final = read_final(folder)
        event = (final.event if final else None) or {}
        error = (event.get("data") or {}).get("error")
        try:
            ended: float | None = (folder / FINAL_FILE).stat().st_mtime
        except FileNotFoundError:
            ended = None
        out.append({
            "attempt": n,
            "status": (event.get("data") or {}).get("status"),
            "error": ({"type": error.get("type"), "message": error.get("message")}
                      if isinstance(error, dict) else None),
            "finished_at": None if ended is None else _iso(ended),
        })
    return out


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
