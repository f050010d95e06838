"""A task: the event log of one submitted workflow, with a cursor per
reader, and its one final event.

Why an append-only log with reader cursors rather than an anyio channel, and
who owns a task from submit to final event: see :mod:`comfy_embed.runtime`.
A task knows the engine that runs it only through :class:`TaskHost`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import errno
import logging
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

import anyio

from comfy_embed.background import Background
from comfy_embed.config import Settings
from comfy_embed.errors import (
    ComfyEmbedError,
    DeadlineExceeded,
    ExecutionFailed,
    NotAccepting,
    OutOfMemory,
    RunTimeout,
    Stalled,
    StorageUnavailable,
    TaskCancelled,
)
from comfy_embed.events import (
    COMFY_TERMINAL,
    FINAL,
    PROGRESS_STATE,
    event,
    final_event,
    queue_event,
)
from comfy_embed.executor import DEADLINE_REASON, Outcome
from comfy_embed.observe.guard import is_out_of_memory
from comfy_embed.observe.metrics import Metrics
from comfy_embed.observe.report import TaskReport, TimedUploader
from comfy_embed.prepare.graph import WorkflowRequest
from comfy_embed.prepare.options import RunOptions
from comfy_embed.results import collect_values, render_inline, render_results
from comfy_embed.storage import Store
from comfy_embed.variants import VariantRun

log = logging.getLogger(__name__)

__all__ = ["Task", "TaskHost", "TaskObserver"]

_COALESCE = frozenset({"progress", "progress_state", "queue"})


class TaskHost(Protocol):
    """What a task uses of the engine that runs it (all of it public)."""

    settings: Settings
    metrics: Metrics
    #: Where assembling a result runs (a part of the engine's task group).
    renders: Background

    def store(self, name: str | None = None) -> Store: ...

    def cancel(self, task_id: str, reason: str = "cancelled") -> bool: ...

    def drop_inputs(self, task_id: str) -> None:
        """Delete the inputs materialised for the task (after its final event)."""
        ...

    def job_ended(self) -> None:
        """The task's job left the executor (called on the loop, before its
        result is assembled)."""
        ...


class TaskObserver(Protocol):
    """Told of every task the engine accepts (the service's task-log writer is one)."""

    def task_accepted(self, task: Task) -> bool:
        """``task`` was just queued (called on the loop, before ``submit``
        returns and before any executor message reaches it; only its
        ``status``/``queue`` events are there). True: this observer writes
        the task's final event where it lasts and sets ``task.final_written``
        once it is (whatever happens); False: not a task of this observer."""
        ...


class Task:
    """One submitted workflow: its events so far and, at the end, its result.

    Events are numbered from 1 as they arrive (the numbers every reader, the
    task log and the status endpoint share). Each ``progress_state`` lists
    every node, so only the latest is kept: an older one is replaced by a
    gap in the numbering, which readers skip. Past ``max_task_events`` only
    terminal events are kept (plus the last progress, just before them).
    """

    def __init__(self, engine: TaskHost, task_id: str, prompt_id: str, seeds: dict[str, int],
                 options: RunOptions, *, report: TaskReport | None = None) -> None:
        self.engine = engine
        self.task_id = task_id
        self.prompt_id = prompt_id
        self.seeds = seeds
        #: Event n is ``_events[n - 1]``; None where a later event superseded it.
        self._events: list[dict[str, Any] | None] = []
        self._snapshot_at: int | None = None
        self._max_events = engine.settings.tasklog.max_events
        self._kept = 0
        #: Events not kept because the task reached ``max_task_events``.
        self.dropped = 0
        self._held: dict[tuple[str, Any], dict[str, Any]] = {}
        self.final: dict[str, Any] | None = None
        #: The error behind a failed final event (None on success).
        self.error: ComfyEmbedError | None = None
        self.state = "queued"
        self._loop = asyncio.get_running_loop()
        # Executor callbacks run in the submitter's context: their log
        # records (and those of the work they start) carry the task id.
        self._context = contextvars.copy_context()
        self._changed = asyncio.Event()
        #: Set by the final event and by :meth:`wake` only (see :meth:`end_or_wake`).
        self._ended_or_woken = asyncio.Event()
        #: How the result is delivered (base64, uploads, re-encoding).
        self.options = options
        self._timeout_handle: asyncio.TimerHandle | None = None
        #: monotonic time the executor started running it (None: never ran).
        self._started_at: float | None = None
        #: The parsed request: envelope fields (``extra_data``, targets) included.
        self.request: WorkflowRequest | None = None
        #: The graph as it was queued (seeds resolved, inputs in place), kept in
        #: the task log beside the run record so ``?replay=`` can run it again.
        self.resolved_graph: dict[str, Any] | None = None
        #: Timings and memory of this task, frozen into the final's data.report.
        self.report = report or TaskReport()
        #: Set once the final event is written by the observer that persists
        #: the task (the answer waits for it), or at once when none does
        #: (library use).
        self.final_written = anyio.Event()
        # Executor-thread messages wait here; one loop wake-up takes a burst.
        self._inbox: collections.deque[tuple[Any, tuple[Any, ...]]] = collections.deque()
        self._wake_pending = False
        #: Its live forecast (comfy_embed.eta.Forecast), set by the engine as it is queued.
        self.forecast: Callable[[], Any] | None = None
        #: The variants this task runs (``?variants=``), whose answer they group.
        self.variants: VariantRun | None = None

    # ---------------------------------------------------------- consumers
    @property
    def done(self) -> bool:
        return self.final is not None

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events kept so far, in order (a copy)."""
        return [ev for ev in self._events if ev is not None]

    @property
    def last_seq(self) -> int:
        """The number of the latest event."""
        return len(self._events)

    def events_since(self, since: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """``(seq, event)`` of the kept events after ``since``."""
        return [(seq, ev) for seq, ev in enumerate(self._events[since:], start=since + 1)
                if ev is not None]

    async def stream(self, since: int = 0, coalesce: bool = True
                     ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """``(seq, event)`` for every event after the first ``since`` (seq is
        1-based), ending with the final one.

        With ``coalesce``, a reader that is behind skips progress messages
        that a later one of the same node supersedes.
        """
        pos = since
        while True:
            if pos < len(self._events):
                pending = self.events_since(pos)
                pos = len(self._events)
                for seq, ev in (_coalesce(pending) if coalesce and len(pending) > 1 else pending):
                    yield seq, ev
                    if ev["type"] == FINAL:
                        return
                continue
            if self.final is not None:
                return
            await self.changed()

    def wake(self) -> None:
        """Wake whoever waits in :meth:`changed` or :meth:`end_or_wake`
        (with no new event)."""
        self._changed.set()
        self._ended_or_woken.set()

    async def end_or_wake(self) -> None:
        """Wait for the final event or a :meth:`wake`, not for every event: a
        waiter woken by every progress message takes the GIL from the
        executor thread each time, in the middle of the run."""
        self._ended_or_woken.clear()
        if self.final is None:
            await self._ended_or_woken.wait()

    async def changed(self) -> None:
        """Wait for the next event."""
        self._changed.clear()
        await self._changed.wait()

    async def wait(self) -> dict[str, Any]:
        """The final ``serverless_api`` event, when the task has one."""
        while self.final is None:
            await self.end_or_wake()
        return self.final

    async def result(self) -> dict[str, Any]:
        """The final event; raises the task's typed error if it failed."""
        final = await self.wait()
        if self.error is not None:
            raise self.error
        return final

    def cancel(self, reason: str = "cancelled") -> bool:
        return self.engine.cancel(self.task_id, reason)

    def eta_fields(self) -> dict[str, Any]:
        """``{"eta_start", "eta_finish"}``: seconds from now until it starts and
        until it finishes (None: not known; 0 once started, resp. done)."""
        forecast = self.forecast() if self.forecast is not None else None
        return {"eta_start": None, "eta_finish": None} if forecast is None else forecast.fields()

    # ---------------------------------------------------- loop-side updates
    def _publish(self, ev: dict[str, Any]) -> None:
        if self.final is not None:
            return  # exactly one terminal event; nothing after it
        kind = ev["type"]
        # ComfyUI's end-of-run messages, and the ``executing`` with no node
        # that native clients wait for, are never dropped.
        terminal = (kind == FINAL or kind in COMFY_TERMINAL
                    or (kind == "executing" and ev["data"].get("node") is None))
        if not terminal and self._kept >= self._max_events:
            # Over the cap: keep only the latest progress, for just before the end.
            if kind in _COALESCE:
                self._held[(kind, ev["data"].get("node"))] = ev
            else:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("task %s: over %d events; keeping only terminal events",
                                self.task_id, self._max_events)
            return
        if kind == FINAL:
            self._observe_final(ev)
        if terminal and self._held:
            held, self._held = list(self._held.values()), {}
            for h in held:
                self._append(h)
        self._append(ev)
        if kind == FINAL:
            self.final = ev
            self.engine.drop_inputs(self.task_id)
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._ended_or_woken.set()
        self._changed.set()

    def _observe_final(self, ev: dict[str, Any]) -> None:
        """Report and metrics, as the final event is built."""
        metrics = self.engine.metrics
        report = self.report.finish()
        if self.engine.settings.observe.task_report:
            ev["data"]["report"] = report
        metrics.task_report(report)
        metrics.task_ended(None if self.error is None else self.error.type)

    def _append(self, ev: dict[str, Any]) -> None:
        if ev["type"] == PROGRESS_STATE:
            if self._snapshot_at is not None:
                self._events[self._snapshot_at] = None
                self._kept -= 1
            self._snapshot_at = len(self._events)
        self._events.append(ev)
        self._kept += 1

    def _close(self, error: ComfyEmbedError | None = None,
               results: list[dict[str, Any]] | None = None,
               outputs: dict[str, dict[str, Any]] | None = None) -> None:
        """Publish the one final event: success with ``results``, or ``error``."""
        if self.final is not None:
            return
        if error is not None and self.variants is not None:
            self.variants.name_error(error)
        self.error = error
        self.state = "success" if error is None else "error"
        ev = final_event(self.task_id, self.prompt_id, self.seeds, results,
                         error=None if error is None else error.to_dict(),
                         execution_time=self._execution_time(), outputs=outputs)
        if error is None and self.variants is not None:
            ev["data"]["variants"] = self.variants.group(ev["data"]["results"])
        self._publish(ev)

    def _execution_time(self) -> float:
        """Seconds from the start of execution until now (0 if it never ran)."""
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    # ------------------------------------------- executor-thread callbacks
    def _from_executor(self, kind: str, data: dict[str, Any]) -> None:
        self.report.on_event(kind, data)
        self._threadsafe(self._publish, event(kind, data))

    def _on_start(self) -> None:
        self.report.started()
        # Stamped here, on the executor thread, when the run really starts
        # (the loop may take a burst of messages at once, later).
        self._started_at = time.monotonic()
        self._threadsafe(self._started)

    def _on_position(self, ahead: int) -> None:
        self._threadsafe(self._queue_position, ahead)

    def _queue_position(self, ahead: int) -> None:
        """A ``queue`` event while waiting: ``position`` is how many tasks
        are ahead (the running one included). One that raced the start is dropped."""
        if self.state == "queued":
            self._publish(queue_event(self.prompt_id, ahead, self.eta_fields()))

    def _on_done(self, outcome: Outcome) -> None:
        self.report.executed()
        self._threadsafe(self._spawn_finish, outcome)

    def _threadsafe(self, fn: Any, *args: Any) -> None:
        # Called on the executor thread. Append first, then check the flag:
        # the loop clears the flag before it drains, so nothing is stranded.
        self._inbox.append((fn, args))
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain, context=self._context)
        except RuntimeError:  # the submitting loop is gone; nobody is listening
            log.warning("task %s: event loop closed, dropping %s", self.task_id, fn)

    def _drain(self) -> None:
        self._wake_pending = False
        while self._inbox:
            fn, args = self._inbox.popleft()
            fn(*args)

    def _started(self) -> None:
        self.state = "running"
        limit = self.engine.settings.jobs.run_timeout
        if limit:
            self._timeout_handle = self._loop.call_later(
                limit, self.engine.cancel, self.task_id, "timeout")

    def _spawn_finish(self, outcome: Outcome) -> None:
        # A loop callback. Results that need no awaiting (small base64 files,
        # or none) are built here; the rest goes to the engine's task group,
        # which shutdown drains (see the module docstring).
        self.engine.job_ended()
        if outcome.success and self._finish_inline(outcome):
            return
        self.engine.renders.spawn(self._finish, outcome, name=f"result of {self.task_id}")

    def _finish_inline(self, outcome: Outcome) -> bool:
        if not self.options.renders_inline:
            return False
        self.report.mark_render()
        try:
            results = render_inline(outcome.files, output_base64=self.options.output_base64)
            if results is None:
                return False
            self.report.mark_render(end=True)
            self._close(results=results, outputs=collect_values(outcome.outputs))
        except Exception as e:
            self._close_failed(e)
        return True

    def _close_failed(self, e: Exception) -> None:
        """Assembling the result failed: a final event all the same."""
        if not isinstance(e, ComfyEmbedError):
            log.exception("task %s: finishing failed", self.task_id, exc_info=e)
            e = ExecutionFailed(f"could not assemble the result: {e}")
        self._close(e)

    async def _finish(self, outcome: Outcome) -> None:
        try:
            if outcome.success:
                self.report.mark_render()
                results = await self._render(outcome)
                self.report.mark_render(end=True)
                self._close(results=results, outputs=collect_values(outcome.outputs))
            else:
                jobs = self.engine.settings.jobs
                self._close(_outcome_error(outcome, jobs.run_timeout,
                                           server_folders(self.engine.settings),
                                           stall=jobs.stall_seconds))
        except anyio.get_cancelled_exc_class():
            # The instance is shutting down mid-upload: still one final event.
            self._close(TaskCancelled("the instance shut down before the result was assembled",
                                      details={"interrupted_by": "shutdown"}))
            raise
        except Exception as e:
            self._close_failed(e)

    async def _render(self, outcome: Outcome) -> list[dict[str, Any]]:
        o = self.options
        store = TimedUploader(self.engine.store(), self.report) if o.output_oss else None
        return await render_results(outcome.files, output_base64=o.output_base64, store=store,
                                    credentials=o.credentials, output_format=o.output_format,
                                    quality=o.quality)


#: The OSError family as ComfyUI names it in ``exception_type``.
_OS_ERRORS = frozenset({"OSError", "IOError", "PermissionError", "FileExistsError",
                        "FileNotFoundError", "NotADirectoryError", "IsADirectoryError"})
#: Errors that mean "this filesystem takes no file now", wherever they happen.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:]+)")


def server_folders(settings: Settings) -> dict[str, Path]:
    """The server's folders by role, longest path first (a folder inside
    another is replaced before it): what :func:`scrub_paths` hides."""
    c = settings.comfy
    folders = {"<task log>": settings.task_log_path, "<output>": c.output_path,
               "<input>": c.input_path, "<temp>": c.temp_path, "<models>": c.models_path,
               "<base>": Path(c.base_dir).resolve()}
    return dict(sorted(folders.items(), key=lambda kv: -len(str(kv[1]))))


def scrub_paths(value: Any, folders: dict[str, Path]) -> Any:
    """``value`` (a string, or lists/dicts of them) with every server folder
    replaced by its role (``<output>/t1/x.png``): clients never see the
    server's absolute paths."""
    if isinstance(value, str):
        for role, folder in folders.items():
            value = value.replace(str(folder), role)
        return value
    if isinstance(value, list):
        return [scrub_paths(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: scrub_paths(v, folders) for k, v in value.items()}
    return value


def _storage_error(err: dict[str, Any], folders: dict[str, Path]) -> StorageUnavailable | None:
    """An output node's OSError that says the output (or temp) folder takes
    no file: StorageUnavailable (503), naming the folder by its role."""
    if err.get("exception_type") not in _OS_ERRORS:
        return None
    msg = str(err.get("exception_message") or "")
    m = _ERRNO.match(msg)
    code, why = (int(m.group(1)), m.group(2).strip()) if m else (None, err["exception_type"])
    for role, name in (("<output>", "output"), ("<temp>", "temp")):
        folder = folders.get(role)
        if folder is not None and (str(folder) in msg or code in _STORAGE_ERRNOS):
            return StorageUnavailable(f"the {name} folder cannot take a file ({why}); retry later")
    return None


def _stalled(err: dict[str, Any], seconds: float | None) -> Stalled:
    """The error of a run the stall watchdog interrupted (comfy_embed/watchdog.py)."""
    node_id, node_type = err.get("node_id"), err.get("node_type")
    where = f"node {node_id} ({node_type})" if node_id else "the run"
    quiet = f" for {seconds:g}s" if seconds else ""
    end = (" and ignored the interrupt: the instance is being replaced"
           if err.get("interrupt_ignored") else " and was interrupted")
    msg = f"{where} sent no progress{quiet}{end}"
    node_errors = {node_id: {"errors": [{"type": Stalled.type, "message": msg, "details": "",
                                         "extra_info": {}}],
                             "dependent_outputs": [], "class_type": node_type}} if node_id else {}
    return Stalled(msg, node_errors=node_errors, details={**err, "stall_seconds": seconds})


def _outcome_error(outcome: Outcome, timeout: float | None,
                   folders: dict[str, Path] | None = None, *,
                   stall: float | None = None) -> ComfyEmbedError:
    err = dict(outcome.error or {})
    if folders:
        storage = _storage_error(err, folders)
        if storage is not None:
            log.warning("task: %s (%s: %s)", storage.message, err.get("exception_type"),
                        err.get("exception_message"))
            return storage
        err = scrub_paths(err, folders)
    reason = err.pop("reason", None)
    if outcome.interrupted and str(reason).startswith(DEADLINE_REASON):  # dropped unrun
        why = str(reason).removeprefix(DEADLINE_REASON)
        return DeadlineExceeded(f"the task was dropped from the queue: {why}", details=err)
    if outcome.interrupted:
        if reason == "timeout":
            return RunTimeout(f"the run exceeded its time limit of {timeout:g}s and was interrupted",
                              details=err)
        if reason == "stalled":  # silent too long: comfy_embed/watchdog.py
            return _stalled(err, stall)
        if reason == "replaced":  # queued behind a node that ignored it: lost, run elsewhere
            return NotAccepting("this instance is being replaced (a node ignored the stall "
                                "interrupt) before the task could run; retry it")
        if reason == "shutdown":
            # Marked: a lost run, which a retry runs again (tasklog/attempts.py).
            return TaskCancelled("the instance shut down (SIGTERM) before the task finished; "
                                 "it was interrupted", details={**err, "interrupted_by": "shutdown"})
        where = f" at node {err['node_id']} ({err.get('node_type')})" if err.get("node_id") else ""
        return TaskCancelled(f"the task was cancelled{where}", details=err)
    node_id, node_type = err.get("node_id"), err.get("node_type")
    msg = err.get("exception_message") or err.get("reason") or "execution failed"
    node_errors = {}
    if node_id:
        node_errors = {node_id: {"errors": [{"type": err.get("exception_type", "exception"),
                                             "message": msg, "details": "",
                                             "extra_info": {}}],
                                 "dependent_outputs": [], "class_type": node_type}}
    where = f"node {node_id} ({node_type}) failed: " if node_id else ""
    details = {k: v for k, v in err.items() if k != "current_outputs"}
    if is_out_of_memory(err):
        return OutOfMemory(f"{where}out of memory ({err.get('exception_type', 'Error')}: {msg}); "
                           "cached memory was freed: retry, or use a smaller size or batch",
                           node_errors=node_errors, details=details)
    return ExecutionFailed(f"{where}{err.get('exception_type', 'Error')}: {msg}",
                           node_errors=node_errors, details=details)


def _coalesce(events: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """Drop progress events superseded by a later one for the same node."""
    latest: dict[tuple[str, Any], int] = {}
    for seq, ev in events:
        if ev["type"] in _COALESCE:
            latest[(ev["type"], ev["data"].get("node"))] = seq
    return [(seq, ev) for seq, ev in events
            if ev["type"] not in _COALESCE or latest[(ev["type"], ev["data"].get("node"))] == seq]


