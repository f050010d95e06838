"""``POST /api/serverless/run?replay=<task_id>``: a finished task run again.

Every queued task leaves, beside its final event in the task log, the graph
as it was queued (seeds resolved, so the same pixels come out) and its run
record (``data.report.environment``). A replay submits that graph as a new
task and says how the environment differs now from the recorded one
(environment/drift.py: ComfyUI's commit, packs, model hashes, torch, device,
the lock).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from comfy_embed.environment.drift import differences
from comfy_embed.errors import InvalidParameter
from comfy_embed.runtime import Engine, Task
from comfy_embed.tasklog.expiry import Policy
from comfy_embed.tasklog.files import FINAL_FILE
from comfy_embed.tasklog.log import TaskLog

log = logging.getLogger(__name__)

__all__ = ["REPLAY_RECORD", "Replay", "read_replay", "replay_record", "write_replay"]

#: The task-log record holding what ``?replay=`` needs.
REPLAY_RECORD = "replay.json"


def replay_record(task: Task) -> bytes | None:
    """``{"graph", "environment"}`` of a task that was queued (None: it was not)."""
    if task.resolved_graph is None:
        return None
    return orjson.dumps({"graph": task.resolved_graph, "environment": task.report.environment})


def write_replay(tasklog: TaskLog, task: Task, policy: Policy) -> None:
    """Store the task's record once its final event is written (blocking):
    none for a task that keeps nothing (its graph holds the prompt texts)
    or was deleted meanwhile; a failed write costs only the replay."""
    try:
        record = replay_record(task) if policy.keeps_inputs else None
        if record is not None:
            tasklog.put_record(task.task_id, REPLAY_RECORD, record)
    except OSError as e:
        log.warning("task %s: its replay record was not written (%s)", task.task_id, e)
    except Exception:  # never in the way of the task's own wrap-up (its webhook)
        log.exception("task %s: its replay record was not written", task.task_id)


def _just_ended(tasklog: TaskLog, task_id: str, within: float = 2.0) -> bool:
    """Whether the task's final event was written less than ``within`` seconds ago."""
    try:
        return time.time() - (tasklog.task_dir(task_id) / FINAL_FILE).stat().st_mtime < within
    except (OSError, ValueError):
        return False


class Replay:
    """A recorded task to run again: its graph and how the environment changed."""

    def __init__(self, task_id: str, graph: dict[str, Any], recorded: dict[str, Any] | None,
                 now: dict[str, Any] | None) -> None:
        self.task_id = task_id
        self.graph = graph
        #: ``{key: {"recorded", "now"}}`` (packs and models entry by entry);
        #: the lock's drift at either time is not compared (it is in each report).
        self.differences = differences(_comparable(recorded), _comparable(now))

    def describe(self) -> dict[str, Any]:
        return {"of": self.task_id, "differences": self.differences}


def _comparable(record: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (record or {}).items() if k != "drift"}


def read_replay(tasklog: TaskLog, engine: Engine, task_id: str) -> Replay:
    """The replay of ``task_id`` (blocking: a task-log read and, for model files
    not hashed since they changed, hashing). InvalidParameter naming
    ``replay`` when the task left no record."""
    raw = tasklog.get_record(task_id, REPLAY_RECORD)
    while raw is None and _just_ended(tasklog, task_id):
        time.sleep(0.02)  # the record follows the answer (write_replay): moments later
        raw = tasklog.get_record(task_id, REPLAY_RECORD)
    if raw is None:
        raise InvalidParameter(f"replay: task {task_id} has no recorded graph to run again "
                               "(unknown, deleted, still running, or refused before it ran)")
    saved = orjson.loads(raw)
    graph = saved["graph"]
    now = engine.fingerprint.record(graph) if engine.fingerprint is not None else None
    return Replay(task_id, graph, saved.get("environment"), now)
