"""Attempts as the service sees them: a retry of a task whose last attempt
was lost claims it again (tasklog/attempts.py keeps the earlier ones), and
the final event of every attempt says which one it ends."""

from __future__ import annotations

import hmac
import time
from typing import Any

from comfy_embed.tasklog.log import TaskLog

__all__ = ["Attempts"]


class Attempts:
    """The attempts of the tasks this service claims, up to ``max_attempts``
    runs of one id. The claim-side methods block on the log: call them where
    the claim runs (a worker thread, or the loop while the disk is quick)."""

    def __init__(self, tasklog: TaskLog, max_attempts: int) -> None:
        self.tasklog = tasklog
        self.max_attempts = max_attempts
        #: Each claimed task's attempt number and earlier attempts, until its final.
        self._claimed: dict[str, tuple[int, list[dict[str, Any]]]] = {}

    def retry(self, task_id: str, owner_key: str | None) -> bool:
        """Claim a known task again for its next attempt: only when its last
        attempt was lost, attempts are left, the caller holds the key that
        created it (or keys are off), and no other retry took it first."""
        recorded = self.tasklog.key_hash(task_id)
        if owner_key is None or recorded is None:
            if owner_key is not None or recorded is not None:
                return False
        elif not hmac.compare_digest(recorded, owner_key):
            return False
        return self.tasklog.retry(task_id, self.max_attempts)

    def claimed(self, task_id: str) -> None:
        """This service claimed ``task_id``: note its attempt (and the
        earlier ones, after a retry) for its final event."""
        attempt = self.tasklog.attempts.get(task_id, 1)
        self._claimed[task_id] = (
            attempt, self.tasklog.earlier_attempts(task_id) if attempt > 1 else [])

    def forget(self, task_id: str) -> None:
        """The claim came to nothing (refused, or not this request's)."""
        self._claimed.pop(task_id, None)

    def stamp(self, task_id: str, final: dict[str, Any]) -> None:
        """Put the attempt a final event ends in it (``attempt``; after a
        retry, ``attempts``: every attempt, oldest first, this one last)."""
        data = final.get("data")
        attempt, earlier = self._claimed.pop(task_id, (1, []))
        if not isinstance(data, dict) or "attempt" in data:
            return
        data["attempt"] = attempt
        if earlier:
            error = data.get("error")
            data["attempts"] = [*earlier, {
                "attempt": attempt, "status": data.get("status"),
                "error": ({"type": error.get("type"), "message": error.get("message")}
                          if isinstance(error, dict) else None),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
