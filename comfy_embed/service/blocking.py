"""Where the request path's small blocking file calls run (the task log's
claim and final write): on the event loop while they are quick, else in a
worker thread.

On a local disk a claim takes 0.1-0.4 ms and the fsynced final event
0.5-1 ms, while handing either to a worker thread and back costs two thread
wake-ups, which on a busy or virtualised machine cost 0.15-0.3 ms each and
made a 10-ms answer 12 % slower (benchmarks/RESULTS.md, issue 14). A shared
network mount (NFS, ossfs) can take tens of milliseconds, and blocking the
loop that long would stall every request on the instance. So every call is
timed: calls run on the loop only after ``streak`` quick ones in a row, and
one slow call sends them back to worker threads until the streak is whole
again.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import anyio.to_thread

__all__ = ["BlockingCalls"]

T = TypeVar("T")


class BlockingCalls:
    """Runs blocking calls on the loop while they stay under ``limit``
    seconds (0: always in a worker thread)."""

    def __init__(self, limit: float, streak: int = 8) -> None:
        self.limit = limit
        self.streak = streak
        #: Calls in a row that took less than ``limit``. Worker threads update
        #: it too; a lost update only delays a switch by a call.
        self._quick = 0

    @property
    def inline(self) -> bool:
        """Whether the next call runs on the event loop."""
        return self.limit > 0 and self._quick >= self.streak

    def observe(self, seconds: float) -> None:
        self._quick = self._quick + 1 if seconds < self.limit else 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, on the loop or in a worker thread. Like
        ``anyio.to_thread.run_sync``, a started call is not cancelled."""
        if self.inline:
            return self._timed(fn, *args)
        return await anyio.to_thread.run_sync(self._timed, fn, *args)

    def _timed(self, fn: Callable[..., T], *args: object) -> T:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.observe(time.perf_counter() - started)
