"""``POST /api/serverless/run?replay=<task_id>``: a finished task run again.

Every queued task leaves, beside its final event in the task log, the graph
as it was queued (seeds resolved, so the same pixels come out) and its run
record (``data.report.environment``). A replay submits that graph as a new
task and says how the environment differs now from the recorded one
(environment/drift.py: ComfyUI's commit, packs, model hashes, torch, device,
the lock).
"""

from __future__ import annotations

from typing import Any

import orjson

from comfy_embed.environment.drift import differences
from comfy_embed.errors import InvalidParameter
from comfy_embed.runtime import Engine, Task
from comfy_embed.tasklog.log import TaskLog

__all__ = ["REPLAY_RECORD", "Replay", "read_replay", "replay_record"]

#: The task-log record holding what ``?replay=`` needs.
REPLAY_RECORD = "replay.json"


def replay_record(task: Task) -> bytes | None:
    """``{"graph", "environment"}`` of a task that was queued (None: it was not)."""
    if task.resolved_graph is None:
        return None
    return orjson.dumps({"graph": task.resolved_graph, "environment": task.report.environment})


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
    if raw is None:
        raise InvalidParameter(f"replay: task {task_id} has no recorded graph to run again "
                               "(unknown, deleted, still running, or refused before it ran)")
    saved = orjson.loads(raw)
    graph = saved["graph"]
    now = engine.fingerprint.record(graph) if engine.fingerprint is not None else None
    return Replay(task_id, graph, saved.get("environment"), now)
