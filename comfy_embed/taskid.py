"""The one rule for task ids.

A task id names a folder of the shared task log and a per-task output folder
on a filesystem that several instances share, so it must be a plain name.
Every layer (API parameters, the service, the engine, the task log,
retention) asks here.
"""

from __future__ import annotations

import re

from comfy_embed.errors import WorkflowInvalid

__all__ = ["TASK_ID_RULE", "valid_task_id", "check_task_id"]

#: The rule, as error messages state it.
TASK_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ -"
_TASK_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def valid_task_id(task_id: object) -> bool:
    """Whether ``task_id`` is a plain folder name by :data:`TASK_ID_RULE`
    (``.`` and ``..`` excluded)."""
    return (isinstance(task_id, str) and _TASK_ID.fullmatch(task_id) is not None
            and task_id not in (".", ".."))


def check_task_id(task_id: str) -> str:
    """``task_id`` itself, or WorkflowInvalid (type ``invalid_task_id``)."""
    if not valid_task_id(task_id):
        raise WorkflowInvalid(f"task id must be {TASK_ID_RULE}", type="invalid_task_id")
    return task_id
