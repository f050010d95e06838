"""``POST /api/serverless/run?replay=<task_id>``: a finished task run again.

Every queued task leaves, with its final event in the task log, the graph
as it was queued (seeds resolved, so the same pixels come out) and its run
record (``data.report.environment``): inside the ``final`` file when it
is small (:data:`EMBED_LIMIT`; no file of its own, written when the answer
goes), else as ``replay.json`` just after the answer. A replay submits that graph as a new
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

__all__ = ["EMBED_LIMIT", "REPLAY_RECORD", "Replay", "read_replay", "replay_record",
           "write_replay"]

#: The task-log record holding what ``?replay=`` needs.
REPLAY_RECORD = "replay.json"
#: A record up to this size (JSON bytes) goes into the final file; a larger
#: one (a huge graph) gets its own file after the answer, so the final
#: file, which every status read decodes, stays small.
EMBED_LIMIT = 32 * 1024


def replay_record(task: Task, policy: Policy) -> bytes | None:
    """``{"graph", "environment"}`` of a task that was queued, as JSON; None
    when it was not, or keeps nothing (its graph holds the prompt texts). A
    record that cannot be made costs only the replay (logged)."""
    if task.resolved_graph is None or not policy.keeps_inputs:
        return None
    try:
        return orjson.dumps({"graph": task.resolved_graph, "environment": task.report.environment})
    except Exception:  # never in the way of the task's own wrap-up (its final event)
        log.exception("task %s: its replay record was not made", task.task_id)
        return None


def write_replay(tasklog: TaskLog, task_id: str, record: bytes) -> None:
    """Store a record too large for the final file, once that is written
    (blocking); a failed write (the task deleted meanwhile, a full disk)
    costs only the replay."""
    try:
        tasklog.put_record(task_id, REPLAY_RECORD, record)
    except OSError as e:
        log.warning("task %s: its replay record was not written (%s)", task_id, e)
    except Exception:  # never in the way of the task's own wrap-up (its webhook)
        log.exception("task %s: its replay record was not written", task_id)


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
    saved = tasklog.final_record(task_id, REPLAY_RECORD)
    if saved is None:
        raw = tasklog.get_record(task_id, REPLAY_RECORD)
        while raw is None and _just_ended(tasklog, task_id):
            time.sleep(0.02)  # a large record follows the answer (write_replay): moments later
            raw = tasklog.get_record(task_id, REPLAY_RECORD)
        saved = None if raw is None else orjson.loads(raw)
    if not isinstance(saved, dict) or not isinstance(saved.get("graph"), dict):
        raise InvalidParameter(f"replay: task {task_id} has no recorded graph to run again "
                               "(unknown, deleted, still running, or refused before it ran)")
    graph = saved["graph"]
    now = engine.fingerprint.record(graph) if engine.fingerprint is not None else None
    return Replay(task_id, graph, saved.get("environment"), now)
