"""Memory guard: watermarks after each job, the CUDA out-of-memory policy, and
native ComfyUI's memory upkeep between jobs.

Runs on the executor thread (the executor calls it between jobs). When the
process stays above a watermark, or CUDA runs out of memory too many times in
a row, the guard *trips*: the instance stops accepting work, finishes what is
queued, flushes the task log and exits with :data:`EXIT_RECYCLE`, so Function
Compute or Kubernetes replaces it (RAM that grows across runs, ComfyUI
#6494/#10475, is then bounded by a restart instead of an OOM kill mid-task).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from typing import Any, Awaitable, Callable

import anyio

from comfy_embed.config import Settings
from comfy_embed.observe import memory

__all__ = ["EXIT_RECYCLE", "MemoryGuard", "is_out_of_memory", "drain_when_tripped"]

log = logging.getLogger(__name__)

#: The exit status of an instance that recycled itself (EX_TEMPFAIL: the
#: failure is temporary; a fresh instance will do).
EXIT_RECYCLE = 75


def is_out_of_memory(error: dict[str, Any] | None) -> bool:
    """Whether ComfyUI's ``execution_error`` data is an out-of-memory error
    (``torch.OutOfMemoryError``, ``torch.cuda.OutOfMemoryError``)."""
    if not error:
        return False
    kind = str(error.get("exception_type") or "")
    message = str(error.get("exception_message") or "")
    return kind.endswith("OutOfMemoryError") or "CUDA out of memory" in message


class MemoryGuard:
    """The executor's housekeeper: :meth:`after_job` after every job,
    :meth:`run` when :meth:`due_in` says (native's gc cadence).

    ``free_cache`` releases cached accelerator memory (ComfyUI's
    ``soft_empty_cache``); ``on_trip`` is called once, with the reason, when
    the instance must be recycled (from the executor thread).
    ``release_kept`` lets the models kept loaded (COMFY_EMBED_KEEP_LOADED)
    go, with the reason, and names them: the guard's last step under real
    pressure (an out-of-memory error; a watermark still crossed after gc and
    freeing caches), never part of its upkeep.
    """

    def __init__(self, settings: Settings, free_cache: Callable[[], None],
                 on_trip: Callable[[str], None],
                 release_kept: Callable[[str], list[str]] | None = None) -> None:
        self.max_rss = settings.observe.max_rss_bytes
        self.max_vram = settings.observe.max_vram_bytes
        self.oom_limit = settings.observe.oom_recycle_after
        self.gc_interval = settings.observe.gc_interval
        self._free_cache = free_cache
        self._on_trip = on_trip
        self._release_kept = release_kept
        self.tripped = threading.Event()
        self.reason: str | None = None
        #: The status the process exits with once drained (:meth:`trip`'s).
        self.exit_code = EXIT_RECYCLE
        #: Wake-ups of :meth:`wait_tripped` callers (each in its event loop).
        self._waiters: list[Callable[[], None]] = []
        self._waiters_lock = threading.Lock()
        self.ooms_in_a_row = 0
        self._need_gc = False
        self._last_gc = time.monotonic()

    # ------------------------------------------------------- after each job
    def after_job(self, success: bool, error: dict[str, Any] | None) -> None:
        self._need_gc = True
        if is_out_of_memory(error):
            self.ooms_in_a_row += 1
            log.error("CUDA out of memory (%d in a row); freeing cached memory",
                      self.ooms_in_a_row)
            self._release("out of memory")
            self.run()  # ComfyUI unloaded its models; give the memory back now
            if self.oom_limit and self.ooms_in_a_row >= self.oom_limit:
                self.trip(f"{self.ooms_in_a_row} out-of-memory errors in a row")
                return
        elif success:
            self.ooms_in_a_row = 0
        over = self._over()
        if over:
            self.run()  # what gc and the allocators give back does not count
            memory.trim_heap()
            over = self._over()
        if over and self._release(over):  # then the kept models, before recycling
            self.run()
            memory.trim_heap()
            over = self._over()
        if over:
            self.trip(over)

    def _release(self, reason: str) -> list[str]:
        """Let the kept models go (real memory pressure); the names released."""
        if self._release_kept is None:
            return []
        try:
            return self._release_kept(reason)
        except Exception:
            log.exception("releasing the kept models failed")
            return []

    def _over(self) -> str | None:
        if self.max_rss:
            rss = memory.rss_bytes()
            if rss > self.max_rss:
                return f"resident memory {rss} bytes is over the watermark of {self.max_rss}"
        if self.max_vram:
            vram = memory.vram_bytes()
            if vram is not None and vram[1] > self.max_vram:
                return f"CUDA memory reserved {vram[1]} bytes is over the watermark of {self.max_vram}"
        return None

    def trip(self, reason: str, exit_code: int = EXIT_RECYCLE) -> None:
        """Recycle the instance (once; any thread): accept nothing more, drain,
        exit with ``exit_code``. The memory guard's own trips, and the stall
        watchdog's (comfy_embed/watchdog.py, its own exit status)."""
        if self.tripped.is_set():
            return
        self.reason, self.exit_code = reason, exit_code
        with self._waiters_lock:
            self.tripped.set()
            waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()
        log.error("recycling: %s; draining and exiting with status %d to be replaced",
                  reason, exit_code)
        self._on_trip(reason)

    async def wait_tripped(self) -> None:
        """Until the guard trips (on the executor thread, or any other),
        woken by the trip itself rather than by polling."""
        loop = asyncio.get_running_loop()
        tripped = anyio.Event()

        def wake() -> None:
            # Never blocks the tripping thread (the executor's): the loop sets
            # the event when it next runs. A loop already closed has nobody waiting.
            try:
                loop.call_soon_threadsafe(tripped.set)
            except RuntimeError:
                pass

        with self._waiters_lock:
            if self.tripped.is_set():
                return
            self._waiters.append(wake)
        try:
            await tripped.wait()
        finally:
            with self._waiters_lock:
                if wake in self._waiters:
                    self._waiters.remove(wake)

    # ------------------------------------------------------ between jobs
    def due_in(self) -> float | None:
        """Seconds until the next upkeep (<= 0: now); None when none is needed."""
        if not self._need_gc:
            return None
        return self._last_gc + self.gc_interval - time.monotonic()

    def run(self) -> None:
        """What native ComfyUI does between prompts: collect garbage and give
        cached accelerator memory back."""
        gc.collect()
        try:
            self._free_cache()
        except Exception:
            log.exception("freeing cached memory failed")
        self._last_gc = time.monotonic()
        self._need_gc = False


async def drain_when_tripped(guard: MemoryGuard, drain: Callable[[], Awaitable[None]]) -> str:
    """Wait until the guard trips, then ``drain`` (finish queued and running
    work, flush the task log); return the reason. The caller then exits with
    ``guard.exit_code`` (:data:`EXIT_RECYCLE`, or the watchdog's)."""
    await guard.wait_tripped()
    await drain()
    log.error("recycling: drained; exiting with status %d (%s)", guard.exit_code, guard.reason)
    return guard.reason or "memory guard tripped"
