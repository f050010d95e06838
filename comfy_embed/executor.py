"""The one thread that owns ComfyUI: a queue of jobs, run one at a time.

The queue is one FIFO per API key, served round-robin (fair share, see
:mod:`comfy_embed.scheduling`); without keys, one FIFO. A queued job whose
deadline passes, or that could no longer finish by it, is dropped unrun.

ComfyUI's state is process-global (model management, the progress hook, the
interrupt flag, folder paths), so exactly one thread touches it. Jobs report
through plain callbacks called on this thread; the runtime bridges them into
the event loop. A job that fails in any way fails alone: the thread goes on.

A job's :class:`Outcome` leaves this thread complete: after a successful run
the thread resolves the output files to absolute paths (``Outcome.files``),
so nothing above it asks the backend where its folders are.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from comfy_embed.errors import KeyQueueFull, NotAccepting, QueueFull
from comfy_embed.observe.logs import task_context
from comfy_embed.outcome import Outcome, PendingWrite, Sink
from comfy_embed.results import collect_files
from comfy_embed.scheduling import FairQueue, Quotas, late_reason, latest_start

log = logging.getLogger(__name__)

#: The cancel reason of a queued job dropped for its deadline starts so
#: (what follows is why: the final error's message, tasks.py).
DEADLINE_REASON = "deadline: "

__all__ = ["DEADLINE_REASON", "Backend", "Executor", "Job", "Outcome", "Sink"]


class Housekeeper(Protocol):
    """Memory upkeep on the executor thread (see :class:`comfy_embed.observe.guard.MemoryGuard`)."""

    def after_job(self, success: bool, error: dict[str, Any] | None) -> None: ...

    def due_in(self) -> float | None: ...

    def run(self) -> None: ...


class Backend(Protocol):
    """What the executor needs of ComfyUI (a fake stands in for unit tests)."""

    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str],
                sink: Sink, stop: Callable[[], bool] | None = None,
                extra_data: dict[str, Any] | None = None) -> Outcome:
        """Run one prompt. ``stop`` is asked once at execution start, after
        the backend cleared any earlier interrupt; True ends it interrupted.
        ``extra_data`` is native's (client_id, extra_pnginfo...)."""
        ...

    def interrupt(self) -> None: ...

    def directory_of(self, kind: str) -> Path:
        """Absolute folder of an output ``type`` ("output", "temp", "input")."""
        ...


@dataclass(eq=False)
class Job:
    """One validated prompt waiting for, or owning, the executor thread."""

    prompt_id: str
    prompt: dict[str, Any]
    outputs: list[str]
    #: Called on the executor thread with each ComfyUI message.
    emit: Sink
    #: Called on the executor thread once, with the outcome.
    on_done: Callable[[Outcome], None]
    #: Called on the executor thread when the job leaves the queue to run.
    on_start: Callable[[], None] = lambda: None
    #: Called with the number of jobs now ahead of this one (the running one
    #: included, in the order they will run) each time that number changes
    #: while it waits (it grows when another key's job is placed ahead under
    #: fair share); never with 0; any thread.
    on_position: Callable[[int], None] | None = None
    task_id: str = ""
    #: Native's extra_data (client_id, extra_pnginfo...), seen by nodes.
    extra_data: dict[str, Any] = field(default_factory=dict)
    state: str = "queued"  # queued -> running -> done
    cancel_reason: str | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    #: Its fair-share key: the hash of the API key it was sent with ("": none).
    key: str = ""
    #: The workflow's shape (comfy_embed.prepare.shape): what the ETA learns by.
    shape: str = ""
    #: Seconds this job is expected to execute (comfy_embed.eta; None: unknown).
    estimate: float | None = None
    #: time.monotonic() by which it must have finished (None: no deadline);
    #: a queued job that cannot is dropped unrun (``deadline_exceeded``).
    deadline: float | None = None
    #: time.monotonic() when it started executing (None: not yet).
    started_at: float | None = None
    #: Runs the job instead of one ``backend.execute`` (N variants: several
    #: executions in a row, see comfy_embed.variants), given the backend, the
    #: sink and ``stop``.
    run: Callable[[Backend, Sink, Callable[[], bool]], Outcome] | None = None


def _announce(positions: list[tuple[Job, int]]) -> None:
    """Tell each waiting job its new place (outside the lock: callbacks).
    Not 0 (the head while the executor is between jobs or holds its key
    back): what comes next for it is its start."""
    for job, ahead in positions:
        if job.on_position is not None and ahead > 0:
            try:
                job.on_position(ahead)
            except Exception:
                log.exception("on_position of job %s failed", job.prompt_id)


def _cancelled_outcome(job: Job) -> Outcome:
    return Outcome(success=False, interrupted=True, outputs={},
                   error={"prompt_id": job.prompt_id, "node_id": None,
                          "node_type": None, "executed": [],
                          "reason": job.cancel_reason or "cancelled"})


def _with_files(outcome: Outcome, backend: Backend, job: Job) -> Outcome:
    """``outcome`` with its output files resolved; a failed one if they
    cannot be (an output ``type`` the backend has no folder for)."""
    try:
        outcome.files = collect_files(outcome.outputs, backend.directory_of)
        return outcome
    except Exception as e:
        log.exception("job %s: resolving its output files failed", job.prompt_id)
        return Outcome(success=False, interrupted=False, outputs={},
                       error={"prompt_id": job.prompt_id, "node_id": None, "node_type": None,
                              "exception_type": type(e).__name__,
                              "exception_message": f"could not resolve the output files: {e}",
                              "traceback": [], "executed": []},
                       messages=outcome.messages)


def _write_failure(outcome: Outcome, job: Job, writes: list[PendingWrite]) -> Outcome | None:
    """A failed outcome naming the node whose file could not be written, or None."""
    for w in writes:
        e = w.future.exception()
        if e is None:
            continue
        log.error("job %s: writing %s of node %s (%s) failed: %s",
                  job.prompt_id, w.path.name, w.node_id, w.node_type, e)
        return Outcome(success=False, interrupted=False, outputs={},
                       error={"prompt_id": job.prompt_id, "node_id": w.node_id,
                              "node_type": w.node_type, "exception_type": type(e).__name__,
                              "exception_message": f"writing output {w.path.name} failed: {e}",
                              "traceback": [], "executed": []},
                       messages=outcome.messages)
    return None


class Executor:
    """Owns the executor thread. ``boot`` runs first on that thread and
    returns the backend (ComfyUI must be imported on the thread that uses
    its event loop)."""

    def __init__(self, boot: Callable[[], Backend], max_queue: int = 64,
                 quotas: Quotas | None = None, fair: bool = True) -> None:
        self._boot = boot
        self.max_queue = max_queue
        #: Per-key FIFOs served round-robin (one FIFO without keys).
        self._queue: FairQueue[Job] = FairQueue(lambda j: j.key, quotas, fair)
        #: The place last told to each waiting job (ahead of it, running included).
        self._told: dict[Job, int] = {}
        #: Wakes the thread that drops queued jobs past their deadline.
        self._reaper_wake = threading.Event()
        self._reaper: threading.Thread | None = None
        self._runs = 0
        self._cond = threading.Condition()
        self._current: Job | None = None
        #: Jobs whose run ended and whose output files are still being
        #: encoded (Outcome.writes), by prompt id: answered once written.
        self._writing: dict[str, tuple[Job, list[PendingWrite]]] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="comfy-executor", daemon=True)
        self.backend: Backend | None = None
        self.ready = threading.Event()
        self.boot_error: BaseException | None = None
        #: Told of every job's outcome; runs upkeep between jobs when due.
        self.housekeeper: Housekeeper | None = None
        #: Seconds spent executing jobs (for the busy fraction in benchmarks).
        self.busy_seconds = 0.0
        #: Wraps each job's sink as it starts (the stall watchdog, comfy_embed/watchdog.py).
        self.watch: Callable[[Job], Sink] | None = None
        #: Told of each job's execution seconds and outcome (the ETA learns from it).
        self.on_executed: Callable[[Job, float, Outcome], None] | None = None
        self.started_at = time.monotonic()

    # -------------------------------------------------------------- control
    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> Backend:
        """Block until boot finished; re-raise a boot failure."""
        if not self.ready.wait(timeout):
            raise TimeoutError("ComfyUI did not boot in time")
        if self.boot_error is not None:
            raise RuntimeError(f"ComfyUI failed to boot: {self.boot_error}") from self.boot_error
        assert self.backend is not None
        return self.backend

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread; with ``wait``, also
        wait for the jobs whose files are still being written to end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._reaper_wake.set()
        if not wait:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            while self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)

    @property
    def queue_remaining(self) -> int:
        """Queued plus running jobs, as ComfyUI's ``status`` message counts."""
        with self._cond:
            return len(self._queue) + (self._current is not None)

    def pending(self, joining: Job | None = None) -> list[Job]:
        """The queued jobs in the order they will run (not the running one);
        with ``joining`` (not queued), the order were it queued now, it
        included: under fair share a new job need not go last."""
        with self._cond:
            return self._queue.order(joining)

    @property
    def waiting(self) -> int:
        """Jobs queued, the running one not counted (no lock: a gauge)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """1 while a job executes, else 0 (no lock: a gauge)."""
        return int(self._current is not None)

    @property
    def current(self) -> Job | None:
        """The job executing now (no lock: a glance)."""
        return self._current

    @property
    def current_task_id(self) -> str | None:
        """The task id of the job executing now (no lock: a glance)."""
        current = self._current
        return None if current is None else current.task_id

    @property
    def writing(self) -> int:
        """Jobs whose files are still being encoded (no lock: a gauge)."""
        return len(self._writing)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._current is None and not self._writing

    # ----------------------------------------------------------------- jobs
    def submit(self, job: Job) -> int:
        """Queue a job; return how many jobs are ahead of it (running included)."""
        with self._cond:
            if self._closing or self.boot_error is not None:
                raise NotAccepting("the executor is shutting down or failed to boot")
            waiting = len(self._queue)
            if waiting >= self.max_queue:
                raise QueueFull(f"queue is full ({waiting} jobs waiting)")
            try:
                self._queue.push(job)
            except KeyQueueFull as e:
                e.retry_after = self._key_retry_after()
                raise
            self._cond.notify_all()
            moved = self._moved()
            ahead = self._told[job]
            if job.deadline is not None and self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="comfy-deadlines",
                                                daemon=True)
                self._reaper.start()
        if job.deadline is not None:
            self._reaper_wake.set()
        _announce([(j, n) for j, n in moved if j is not job])  # pushed back behind it
        return ahead

    def cancel(self, prompt_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued job (removed at once) or the running one
        (interrupted at its next check). False when the job is unknown or done."""
        with self._cond:
            removed = next((j for j in self._queue.items() if j.prompt_id == prompt_id), None)
            if removed is not None:
                self._queue.remove(removed)
                removed.cancel_reason = reason
                removed.state = "done"
                behind = self._moved()
            else:
                if prompt_id in self._writing:
                    job, writes = self._writing[prompt_id]
                    job.cancel_reason = reason
                    # Those not started are dropped; the job ends when the
                    # running ones are done (_writes_done), interrupted.
                    for w in writes:
                        w.future.cancel()
                    return True
                current = self._current
                if current is None or current.prompt_id != prompt_id:
                    return False
                current.cancel_reason = reason
                # Under the lock, so the flag cannot land on the next job.
                assert self.backend is not None
                self.backend.interrupt()
                return True
        self._finish(removed, _cancelled_outcome(removed))
        _announce(behind)
        return True

    def interrupt(self, job: Job, reason: str) -> bool:
        """Interrupt ``job`` if it is still executing: unlike :meth:`cancel`,
        never once its files are being written (the stall watchdog)."""
        with self._cond:
            if self._current is not job or self.backend is None:
                return False
            job.cancel_reason = reason
            self.backend.interrupt()
            return True

    def abandon(self, job: Job, outcome: Outcome, queued_reason: str) -> bool:
        """Answer the running ``job`` with ``outcome`` while its run is still
        blocked in a node that ignores interrupts (the stall watchdog), and
        the queued jobs as cancelled for ``queued_reason``; close: the thread
        is given up on (if that run ever returns, its outcome is dropped and
        nothing runs after it). False when ``job`` is not the running one."""
        with self._cond:
            if self._current is not job:
                return False
            self._current, self._closing = None, True
            queued = self._queue.clear()
            self._cond.notify_all()
        self._finish(job, outcome)
        for item in queued:
            item.cancel_reason = queued_reason
            self._finish(item, _cancelled_outcome(item))
        return True

    def _moved(self) -> list[tuple[Job, int]]:
        """The waiting jobs whose place (jobs ahead, the running one included,
        in the order they will run) differs from the one last told, with
        their new place; remembered as told. Under the lock."""
        running = int(self._current is not None)
        now = {j: running + i for i, j in enumerate(self._queue.order())}
        moved = [(j, n) for j, n in now.items() if self._told.get(j) != n]
        self._told = now
        return moved

    def _key_retry_after(self) -> int:
        """Seconds until a key over its queue quota likely has room: one
        round of the keys waiting, at the mean run time so far."""
        mean = self.busy_seconds / self._runs if self._runs else 1.0
        return max(1, round(mean * max(1, self._queue.keys_waiting())))

    def _late(self) -> list[Job]:
        """Take out the waiting jobs that can no longer end by their deadline
        (marked done; :meth:`_drop` answers them). Under the lock."""
        now = time.monotonic()

        def late(j: Job) -> bool:
            start_by = latest_start(j.deadline, j.estimate)
            return start_by is not None and now > start_by

        gone = self._queue.remove_where(late)
        for job in gone:
            job.state = "done"
            assert job.deadline is not None
            job.cancel_reason = DEADLINE_REASON + late_reason(job.deadline, job.estimate, now)
        return gone

    def _drop(self, late: list[Job]) -> None:
        for job in late:
            log.info("job %s (task %s) dropped unrun: %s", job.prompt_id, job.task_id,
                     job.cancel_reason)
            self._finish(job, _cancelled_outcome(job))

    def _reap(self) -> None:
        """The thread that drops late queued jobs (started by the first job
        with a deadline): also while a job executes, so a dropped one's
        final event comes when its deadline passes, not when the queue moves."""
        while True:
            self._reaper_wake.clear()
            with self._cond:
                if self._closing and not self._queue:
                    return
                late = self._late()
                moved = self._moved() if late else []
                starts = [latest_start(j.deadline, j.estimate) for j in self._queue.items()]
                due = min((s for s in starts if s is not None), default=None)
            self._drop(late)
            _announce(moved)
            wait = None if due is None else max(0.0, due - time.monotonic()) + 0.001
            self._reaper_wake.wait(min(wait or 1.0, 1.0) if self._closing else wait)

    # --------------------------------------------------------------- thread
    def _run(self) -> None:
        try:
            self.backend = self._boot()
        except BaseException as e:
            log.exception("ComfyUI boot failed")
            with self._cond:  # submit sees it under the lock: nothing is queued after
                self.boot_error = e
            self.ready.set()
            self._fail_queued(e)
            return
        self.ready.set()
        while True:
            if self._upkeep_due():
                self._upkeep()
            with self._cond:
                while not self._queue and not self._closing:
                    due = self._upkeep_due_in()
                    if due is not None and due <= 0:
                        break  # idle: do the upkeep now, as native's worker does
                    self._cond.wait(due)
                late = self._late()
                job = self._queue.pop()
                if job is not None:
                    job.state = "running"
                    self._current = job
                behind = self._moved()
            self._drop(late)
            _announce(behind)
            if job is None:
                if self._closing and not self._queue:
                    return
                if not late:  # held back by its key's running bound: wait for a release
                    with self._cond:
                        if not self._queue.ready():
                            self._cond.wait(self._upkeep_due_in())
                continue
            with task_context(job.task_id):
                self._execute(job)

    def _upkeep_due_in(self) -> float | None:
        return None if self.housekeeper is None else self.housekeeper.due_in()

    def _upkeep_due(self) -> bool:
        due = self._upkeep_due_in()
        return due is not None and due <= 0

    def _upkeep(self) -> None:
        try:
            assert self.housekeeper is not None
            self.housekeeper.run()
        except Exception:
            log.exception("upkeep between jobs failed")

    def _execute(self, job: Job) -> None:
        start = job.started_at = time.monotonic()
        assert self.backend is not None
        try:
            if self.watch is not None:  # the stall watchdog sees its messages
                job.emit = self.watch(job)
            job.on_start()
            if job.run is not None:
                outcome = job.run(self.backend, job.emit, lambda: self._cancelled(job))
            else:
                outcome = self.backend.execute(job.prompt, job.prompt_id, job.outputs, job.emit,
                                               stop=lambda: self._cancelled(job),
                                               extra_data=job.extra_data)
        except BaseException as e:  # the job fails, the thread goes on
            log.exception("job %s (task %s) crashed the executor call", job.prompt_id, job.task_id)
            outcome = Outcome(success=False, interrupted=False, outputs={},
                              error={"prompt_id": job.prompt_id, "node_id": None,
                                     "node_type": None, "exception_type": type(e).__name__,
                                     "exception_message": str(e), "traceback": [],
                                     "executed": []})
        finally:
            self.busy_seconds += time.monotonic() - start
            self._runs += 1
        if self.on_executed is not None:
            try:
                self.on_executed(job, time.monotonic() - start, outcome)
            except Exception:
                log.exception("on_executed of job %s failed", job.prompt_id)
        writes = outcome.writes
        with self._cond:
            if self._current is not job:  # abandoned: answered already
                return
            self._current = None
            if writes:
                self._writing[job.prompt_id] = (job, writes)
        if writes:
            self._await_writes(job, outcome, writes)
        else:
            self._conclude(job, outcome)
        if self.housekeeper is not None:
            try:
                self.housekeeper.after_job(outcome.success, outcome.error)
            except Exception:
                log.exception("memory check after job %s failed", job.prompt_id)

    def _conclude(self, job: Job, outcome: Outcome) -> None:
        """Resolve the files, apply a cancel, answer the job."""
        assert self.backend is not None
        if outcome.success:
            outcome = _with_files(outcome, self.backend, job)
        if job.cancel_reason and not outcome.success:
            outcome.interrupted = True
            if outcome.error is not None:
                outcome.error.setdefault("reason", job.cancel_reason)
        self._finish(job, outcome)

    def _await_writes(self, job: Job, outcome: Outcome, writes: list[PendingWrite]) -> None:
        """Answer ``job`` once its output files are written (on the thread
        that writes the last one); the executor thread goes on meanwhile."""
        left = [len(writes)]
        lock = threading.Lock()

        def one_done(w: PendingWrite) -> None:
            if w.future.cancelled():
                w.path.unlink(missing_ok=True)  # its reserved, empty file
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._writes_done(job, outcome, writes)

        for w in writes:
            w.future.add_done_callback(lambda _, w=w: one_done(w))  # type: ignore[misc]

    def _writes_done(self, job: Job, outcome: Outcome, writes: list[PendingWrite]) -> None:
        # Under the lock: a cancel either lands before (and is honoured) or
        # finds the job gone (already done); and whoever the answer wakes
        # sees the executor without it.
        with self._cond:
            self._writing.pop(job.prompt_id, None)
            cancelled = job.cancel_reason is not None
            self._cond.notify_all()
        with task_context(job.task_id):
            if cancelled and outcome.success:
                outcome = _cancelled_outcome(job)
            elif outcome.success:
                outcome = _write_failure(outcome, job, writes) or outcome
            self._conclude(job, outcome)

    def _cancelled(self, job: Job) -> bool:
        """Asked by the backend right after it cleared its interrupt flag.

        A cancel between dequeue and that point set the flag too early (the
        backend wiped it), so it is honoured here. Under the lock: a cancel
        either is seen here or sets the flag after it was cleared, never neither.
        """
        with self._cond:
            return job.cancel_reason is not None

    def _finish(self, job: Job, outcome: Outcome) -> None:
        if job.state == "running":  # it left the queue: its key's running slot is free
            with self._cond:
                self._queue.release(job)
                self._cond.notify_all()
        job.state = "done"
        try:
            job.on_done(outcome)
        except Exception:
            log.exception("on_done of job %s failed", job.prompt_id)

    def _fail_queued(self, error: BaseException) -> None:
        with self._cond:
            items = self._queue.clear()
        for job in items:
            out = _cancelled_outcome(job)
            out.error = {"reason": f"ComfyUI failed to boot: {error}"}
            self._finish(job, out)
