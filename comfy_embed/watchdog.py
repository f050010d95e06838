"""The stall watchdog (issue 28, ``COMFY_EMBED_STALL_SECONDS``): a running job
that sends no progress for that long is interrupted and fails as ``stalled``,
naming the node; a node that ignores the interrupt too gets the instance
replaced.

Progress is any ComfyUI message of the running job (``executing``,
``progress``, ``progress_state``, ``executed``...): the executor hands each
job's sink to :meth:`Watchdog.watch` as the job starts, and the sink stamps
the time (two attribute writes, no lock, on the executor thread). A timer
thread of its own looks every ``tick`` seconds; it never waits for the
executor thread (only for the executor's lock, which is held for moments):

1. Silent for ``seconds``: the job is interrupted as a cancel is
   (``Executor.interrupt(job, "stalled")``); its final event is a
   ``stalled`` error naming the node ComfyUI was executing.
2. Still running ``seconds`` after that interrupt: the node does not check
   ComfyUI's interrupt flag and the executor thread is lost. The instance
   recycles through the memory guard's path (``recycle(reason,
   EXIT_STALLED)``: nothing new accepted, ``/ready`` 503 with the reason,
   drained, the process exits with :data:`EXIT_STALLED`), after the watchdog
   has answered what the thread never will: each queued job ends
   ``not_accepting`` (a lost run: a retry with its task id, or the durable
   queue, runs it elsewhere) and the stuck one ``stalled`` with
   ``interrupt_ignored``. Nothing runs on that thread again.

Encoding a run's files after it (``Outcome.writes``) is not watched: the
job has left the executor by then.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from comfy_embed.executor import Executor, Job
from comfy_embed.outcome import Outcome, Sink

__all__ = ["EXIT_STALLED", "Watchdog"]

log = logging.getLogger(__name__)

#: The exit status of an instance whose node ignored the stall interrupt
#: (EX_SOFTWARE: this process cannot go on; the memory guard's recycle is 75).
EXIT_STALLED = 70

#: Cancel reasons (comfy_embed.tasks maps them to the final event's error).
STALLED = "stalled"
REPLACED = "replaced"


def node_type(job: Job, node: str | None) -> str | None:
    """The class of ``node`` in ``job``'s graph (None if unknown)."""
    entry = job.prompt.get(node) if node is not None else None
    return entry.get("class_type") if isinstance(entry, dict) else None


class Watchdog:
    """Watches the executor's running job (``executor.watch = watchdog.watch``).

    ``recycle(reason, exit_code)`` recycles the instance (the engine passes
    ``MemoryGuard.trip``). :meth:`check` is the timer thread's one step,
    callable alone with a clock of the caller's (the unit tests do).
    """

    def __init__(self, executor: Executor, seconds: float,
                 recycle: Callable[[str, int], None]) -> None:
        self.executor = executor
        self.seconds = seconds
        self.tick = min(1.0, max(0.05, seconds / 10))
        self._recycle = recycle
        self._lock = threading.Lock()
        #: The job started last, its last message's time and executing node.
        self._job: Job | None = None
        self._beat = 0.0
        self._node: str | None = None
        #: When the watched job was interrupted for its silence (None: not yet).
        self._interrupted_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Jobs interrupted for their silence (a gauge for /metrics and tests).
        self.stalled = 0
        #: Why the instance is being replaced, once a node ignored the interrupt.
        self.wedged: str | None = None
        executor.watch = self.watch

    # ------------------------------------------------------------- control
    def start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="comfy-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.check()
            except Exception:
                log.exception("stall watchdog: a check failed")

    # ------------------------------------------------------ executor thread
    def watch(self, job: Job) -> Sink:
        """``job``'s sink, stamping each message (called as the job starts;
        the first call starts the timer thread)."""
        self.start()
        emit = job.emit
        with self._lock:
            self._beat, self._node, self._interrupted_at = time.monotonic(), None, None
            self._job = job

        def sink(kind: str, data: dict[str, Any]) -> None:
            if self._job is job:
                self._beat = time.monotonic()
                if kind == "executing" and data.get("node") is not None:
                    self._node = str(data["node"])
            emit(kind, data)

        return sink

    # ---------------------------------------------------------- timer thread
    def check(self, now: float | None = None) -> None:
        """Interrupt the running job if silent too long; give it up (and the
        instance) if it was interrupted that long ago and still runs."""
        now = time.monotonic() if now is None else now
        with self._lock:
            job = self._job
            # Between jobs, not started yet, or its files being encoded: not watched.
            if job is None or self.executor.current is not job or self.wedged is not None:
                return
            if self._interrupted_at is None:
                if now - self._beat < self.seconds:
                    return
                self._interrupted_at = now
                wedged = False
            else:
                if now - self._interrupted_at < self.seconds:
                    return
                self.wedged = self._why(job)
                wedged = True
        if wedged:
            self._give_up(job)
        elif self.executor.interrupt(job, STALLED):  # still executing: not yet encoding
            self.stalled += 1
            log.warning("task %s: %s sent no progress for %gs: interrupting it",
                        job.task_id, self._where(job), self.seconds)

    def _where(self, job: Job) -> str:
        node = self._node
        return "the run" if node is None else f"node {node} ({node_type(job, node)})"

    def _why(self, job: Job) -> str:
        return (f"{self._where(job)} of task {job.task_id} sent no progress for "
                f"{self.seconds:g}s and ignored the interrupt for {self.seconds:g}s more")

    def _give_up(self, job: Job) -> None:
        """The node ignores interrupts: answer every job the thread holds,
        recycle the instance, and stop watching."""
        error: dict[str, Any] = {"prompt_id": job.prompt_id, "node_id": self._node,
                                 "node_type": node_type(job, self._node), "executed": [],
                                 "reason": STALLED, "interrupt_ignored": True}
        stuck = Outcome(success=False, interrupted=True, outputs={}, error=error)
        if not self.executor.abandon(job, stuck, REPLACED):
            self.wedged = None  # it returned after all: nothing is lost
            return
        reason = self.wedged or ""
        log.error("stall watchdog: %s; the instance is replaced", reason)
        self._recycle(reason, EXIT_STALLED)
        self._stop.set()
