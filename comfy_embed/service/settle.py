"""Final events written before their answers, fsynced after them, together.

An answer waits for its task's final event to be *written*: from then on
every process and every instance sharing the folder reads it, and a killed
process loses nothing. It does not wait for the fsync that makes the final
survive a crash of the machine. On ext4 every fsync forces a journal
commit, and while that commit's I/O runs, the next request's file creations
(its task folder, its lease, its output folder and image) wait for it:
0.2-0.5 ms each on the benchmark VM, where one fsync per request made the
next request's claim 3-5 times slower even with the fsync off the answer's
path (benchmarks/RESULTS.md, stop 35). So the finals written within
``seconds`` share one round of fsyncs (the first commits the journal, the
others find their files committed), in a worker thread. A crash of the
machine loses at most that span of final events, as it loses their tasks'
output files (which nobody fsyncs); the recovery scan then closes those
tasks as lost.
"""

from __future__ import annotations

import logging

import anyio

from comfy_embed.background import Background
from comfy_embed.tasklog.log import TaskLog

__all__ = ["Settler"]

log = logging.getLogger(__name__)


class Settler:
    """Gathers the tasks whose final :meth:`TaskLog.extend` wrote with
    ``settle_later`` and settles them (:meth:`TaskLog.settle_final`: fsync,
    then the index entry's move) at most ``seconds`` later, in ``group``
    (which shutdown drains: a pending round still runs)."""

    def __init__(self, tasklog: TaskLog, group: Background, seconds: float) -> None:
        self._tasklog = tasklog
        self._group = group
        self.seconds = seconds
        #: Tasks written and not yet in a round.
        self._due: list[str] = []

    def add(self, task_id: str) -> None:
        """Settle ``task_id`` in the next round (the first one due starts it)."""
        self._due.append(task_id)
        if len(self._due) == 1:
            self._group.spawn(self._round, name="fsync of final events")

    async def _round(self) -> None:
        try:
            if self.seconds:
                await anyio.sleep(self.seconds)  # gather the finals of this span
        finally:
            # Cancelled (shutdown) or not, what was written gets its fsync.
            due, self._due = self._due, []
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._settle, due)

    def _settle(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            try:
                self._tasklog.settle_final(task_id)
            except OSError as e:  # written all the same: only a crash of the machine loses it
                log.warning("task %s: cannot fsync its final event: %s", task_id, e)
