"""The async facade over the executor thread: submit, stream, await, cancel.

A :class:`Task` lives in the event loop that submitted it. The executor thread
queues each ComfyUI message for that loop and wakes it once per burst
(``call_soon_threadsafe``): it never waits for the loop, so a slow consumer
cannot stall the GPU. Each task
keeps its events in order; every consumer reads them with its own cursor
(which is what lets a stream, a WebSocket and the task log follow one task),
and a consumer that falls behind gets progress coalesced to the latest value,
never a terminal event dropped.

Why the progress pipe is an append-only event log with reader cursors and
not an anyio memory channel: a channel hands each item to ONE receiver and a
bounded one makes its sender wait when full. Here one task has several
readers at once (the HTTP stream or WebSocket, the task-log writer, a
late ``/status`` or a resumed stream starting from an old sequence number),
each at its own pace, and the writer is the executor thread, which must
never wait for a reader. So events are appended once to the task's list
(from the loop, via ``call_soon_threadsafe``) and each reader keeps its own
position; an ``asyncio.Event`` wakes readers when something is appended.

The lifecycle, and who owns each step (the engine, from submit to final event):

1. ``Engine.submit`` reserves the task id in the engine's registry (the one
   idempotency registry: a retry with the same id, even one arriving while
   the first is still being validated, gets the same :class:`Task`), then
   prepares and validates the graph and queues a :class:`~.executor.Job`.
2. Once queued, the task is registered and every :class:`TaskObserver` is
   told (``task_accepted``). An observer that persists the task (the
   service's task-log writer) answers True and sets ``Task.final_durable``
   once the final event is on disk; with none, the engine sets it at once.
3. The executor thread runs the job; its messages are appended to the
   task's log in the loop. Its :class:`~.executor.Outcome` comes back with
   the output files resolved.
4. Assembling the result (base64, uploads) runs in ``Engine.background``,
   the anyio task group the server's lifespan opens and drains on shutdown
   (``Engine.run`` opens one when none is open). It ends with the one final
   event, built by :meth:`Task._close` (``events.final_event``); cancelled
   there (shutdown), the task still gets a final error event.
5. After the final event the task's materialised inputs are deleted; the
   registry keeps the last few finished tasks for late readers.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import copy
import logging
import shutil
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Protocol

import anyio

from ._comfy import Comfy
from .background import Background
from .config import Settings
from .errors import (ComfyEmbedError, ExecutionFailed, ImageInputError, NotAccepting,
                     OutOfMemory, RunTimeout, TaskCancelled, WorkflowInvalid)
from .events import (COMFY_TERMINAL, FINAL, PROGRESS_STATE, event, final_event, queue_event,
                     status_event)
from .executor import Executor, Job, Outcome
from .guard import MemoryGuard, is_out_of_memory
from .observe import Metrics
from .report import TaskReport, TimedUploader, loader_nodes
from .results import FORMATS, collect_values, render_results
from .storage import Store, open_store
from .taskid import check_task_id, valid_task_id
from .workflow import (WorkflowRequest, check_nodes, isolate_outputs, media_inputs, parse_request,
                       randomize_seeds)

log = logging.getLogger(__name__)

__all__ = ["Engine", "Task", "TaskObserver", "run_workflow"]

#: Finished tasks kept in memory for late readers (the task log keeps all;
#: a final event can hold megabytes of base64, so keep few).
_KEEP_FINISHED = 4
_COALESCE = frozenset({"progress", "progress_state", "queue"})


class TaskObserver(Protocol):
    """Told of every task the engine accepts (the service's task-log writer is one)."""

    def task_accepted(self, task: Task) -> bool:
        """``task`` was just queued (called on the loop, before ``submit``
        returns, before any of its events). True: this observer makes the
        task's final event durable and sets ``task.final_durable`` once it
        is (whatever happens); False: not a task of this observer."""
        ...


class Task:
    """One submitted workflow: its events so far and, at the end, its result.

    Events are numbered from 1 as they arrive (the numbers every reader, the
    task log and the status endpoint share). Each ``progress_state`` lists
    every node, so only the latest is kept: an older one is replaced by a
    gap in the numbering, which readers skip. Past ``max_task_events`` only
    terminal events are kept (plus the last progress, just before them).
    """

    def __init__(self, engine: "Engine", task_id: str, prompt_id: str, seeds: dict[str, int],
                 *, output_base64: bool, output_oss: bool, credentials: Any,
                 output_format: str | None = None, quality: int | None = None,
                 report: TaskReport | None = None) -> None:
        self.engine = engine
        self.task_id = task_id
        self.prompt_id = prompt_id
        self.seeds = seeds
        #: Event n is ``_events[n - 1]``; None where a later event superseded it.
        self._events: list[dict[str, Any] | None] = []
        self._snapshot_at: int | None = None
        self._max_events = engine.settings.max_task_events
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
        self._options = (output_base64, output_oss, credentials, output_format, quality)
        self._timeout_handle: asyncio.TimerHandle | None = None
        #: monotonic time the executor started running it (None: never ran).
        self._started_at: float | None = None
        #: The parsed request: envelope fields (``extra_data``, targets) included.
        self.request: WorkflowRequest | None = None
        #: Timings and memory of this task, frozen into the final's data.report.
        self.report = report or TaskReport()
        #: Set once the final event is durable: written by the observer that
        #: persists the task, or at once when none does (library use).
        self.final_durable = anyio.Event()
        # Executor-thread messages wait here; one loop wake-up takes a burst.
        self._inbox: collections.deque[tuple[Any, tuple[Any, ...]]] = collections.deque()
        self._wake_pending = False

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
        """Wake whoever waits in :meth:`changed` (with no new event)."""
        self._changed.set()

    async def changed(self) -> None:
        """Wait for the next event."""
        self._changed.clear()
        await self._changed.wait()

    async def wait(self) -> dict[str, Any]:
        """The final ``serverless_api`` event, when the task has one."""
        while self.final is None:
            await self.changed()
        return self.final

    async def result(self) -> dict[str, Any]:
        """The final event; raises the task's typed error if it failed."""
        final = await self.wait()
        if self.error is not None:
            raise self.error
        return final

    def cancel(self, reason: str = "cancelled") -> bool:
        return self.engine.cancel(self.task_id, reason)

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
        self._changed.set()

    def _observe_final(self, ev: dict[str, Any]) -> None:
        """Report and metrics, as the final event is built."""
        metrics = self.engine.metrics
        report = self.report.finish()
        if self.engine.settings.task_report:
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
        self.error = error
        self.state = "success" if error is None else "error"
        self._publish(final_event(self.task_id, self.prompt_id, self.seeds, results,
                                  error=None if error is None else error.to_dict(),
                                  execution_time=self._execution_time(), outputs=outputs))

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
            self._publish(queue_event(self.prompt_id, ahead))

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
        limit = self.engine.settings.run_timeout
        if limit:
            self._timeout_handle = self._loop.call_later(
                limit, self.engine.cancel, self.task_id, "timeout")

    def _spawn_finish(self, outcome: Outcome) -> None:
        # A loop callback: the work goes to the engine's task group, which
        # shutdown drains (see the module docstring).
        self.engine.renders.spawn(self._finish, outcome, name=f"result of {self.task_id}")

    async def _finish(self, outcome: Outcome) -> None:
        try:
            if outcome.success:
                self.report.mark_render()
                results = await self._render(outcome)
                self.report.mark_render(end=True)
                self._close(results=results, outputs=collect_values(outcome.outputs))
            else:
                self._close(_outcome_error(outcome, self.engine.settings.run_timeout))
        except ComfyEmbedError as e:
            self._close(e)
        except anyio.get_cancelled_exc_class():
            # The instance is shutting down mid-upload: still one final event.
            self._close(TaskCancelled("the instance shut down before the result was assembled"))
            raise
        except Exception as e:  # a final event, whatever happened
            log.exception("task %s: finishing failed", self.task_id)
            self._close(ExecutionFailed(f"could not assemble the result: {e}"))

    async def _render(self, outcome: Outcome) -> list[dict[str, Any]]:
        output_base64, output_oss, credentials, output_format, quality = self._options
        store = TimedUploader(self.engine.store(), self.report) if output_oss else None
        return await render_results(outcome.files, output_base64=output_base64, store=store,
                                    credentials=credentials, output_format=output_format,
                                    quality=quality)


def _outcome_error(outcome: Outcome, timeout: float | None) -> ComfyEmbedError:
    err = dict(outcome.error or {})
    reason = err.pop("reason", None)
    if outcome.interrupted:
        if reason == "timeout":
            return RunTimeout(f"the run exceeded its time limit of {timeout:g}s and was interrupted",
                              details=err)
        if reason == "shutdown":
            return TaskCancelled("the instance shut down (SIGTERM) before the task finished; "
                                 "it was interrupted", details=err)
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


def boot_comfy(settings: Settings) -> Comfy:
    """ComfyUI booted headless, with the tiny checkpoint built when asked
    for and the preload checkpoints loaded (on the executor thread)."""
    if settings.models_manifest:
        from .model_manifest import ensure_models, load_manifest
        if settings.models_fetch == "startup":
            # Before ComfyUI lists its model folders; /ready waits for this.
            ensure_models(settings)
        else:
            load_manifest(settings.models_manifest)  # a bad manifest fails the boot
    comfy = Comfy.boot(settings)
    if settings.tiny_checkpoint:
        from .models import ensure_tiny_checkpoint
        ensure_tiny_checkpoint(comfy, settings)
    for name in settings.preload:
        comfy.preload(name)
    return comfy


class Engine:
    """ComfyUI in this process, behind one executor thread.

    ``start()`` boots ComfyUI on the executor thread in the background;
    ``await wait_ready()`` (or ``ready``) tells when it can run work.
    """

    def __init__(self, settings: Settings | None = None,
                 boot: Callable[[Settings], Comfy] | None = None) -> None:
        self.settings = settings or Settings.from_env()
        #: Builds the backend on the executor thread (a fake stands in only
        #: in tests of the thread, queue and API mechanics).
        self._boot_backend = boot or boot_comfy
        self.executor = Executor(self._boot, self.settings.max_queue)
        self.metrics = Metrics()
        ex = self.executor
        self.metrics.bind_executor(lambda: ex.waiting, lambda: ex.running,
                                   lambda: ex.busy_seconds)
        self._comfy: Comfy | None = None
        #: The one task registry: queued, running and the last few finished.
        self._tasks: collections.OrderedDict[str, Task] = collections.OrderedDict()
        #: Task ids being prepared (parsed, fetched, validated), not yet queued.
        self._preparing: dict[str, anyio.Event] = {}
        #: Told of each accepted task (the service's task-log writer).
        self.observers: list[TaskObserver] = []
        #: The task group of work that follows a run; ``renders`` (assembling
        #: them), the service's log writers and webhooks are parts of it.
        self.background = Background("engine")
        self.renders = self.background.part("results")
        self._stores: dict[str, Store] = {}
        self._fetcher: Any = None
        self._manifest: list[Any] | None = None
        self.accepting = True
        self._started = False
        self._lock = threading.Lock()
        #: Watermarks, the OOM policy and gc between jobs (on the executor thread).
        self.guard = MemoryGuard(self.settings, self._free_cache, self._recycle)
        self.executor.housekeeper = self.guard

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        with self._lock:
            if not self._started:
                self._started = True
                self.executor.start()
        return self

    def _boot(self) -> Comfy:
        comfy = self._boot_backend(self.settings)
        queue = getattr(getattr(comfy, "server", None), "prompt_queue", None)
        if queue is not None:  # packs read the queue in native's item shape
            queue.pending = lambda: [(0, j.prompt_id, j.prompt, j.extra_data, j.outputs)
                                     for j in self.executor.pending()]
        self._comfy = comfy
        return comfy

    @property
    def ready(self) -> bool:
        return self.executor.ready.is_set() and self.executor.boot_error is None

    def custom_nodes(self) -> dict[str, Any] | None:
        """Custom-node packs found at boot: ``{"loaded": [...], "failed":
        {name: error}}``; None when custom nodes are off or not booted."""
        if not self.settings.custom_nodes or self._comfy is None:
            return None
        packs = self._comfy.packs
        return {"loaded": [p.name for p in packs if p.loaded],
                "failed": {p.name: p.error for p in packs if not p.loaded}}

    async def wait_ready(self) -> None:
        """Wait for ComfyUI; NotAccepting if it failed to boot."""
        if self.ready:  # every submit asks: no worker-thread hop once booted
            return
        self.start()
        try:
            await anyio.to_thread.run_sync(self.executor.wait_ready)
        except RuntimeError as e:
            raise NotAccepting(str(e)) from e

    @property
    def comfy(self) -> Comfy:
        if self._comfy is None:
            raise NotAccepting("ComfyUI is not booted yet")
        return self._comfy

    def _free_cache(self) -> None:
        free = getattr(self._comfy, "free_memory", None)  # a test fake has none
        if free is not None:
            free()

    def _recycle(self, reason: str) -> None:
        """The memory guard tripped: accept nothing more (``/ready`` says
        draining); the server drains and exits (see ``guard.EXIT_RECYCLE``)."""
        self.accepting = False

    def close(self) -> None:
        """Stop accepting work, finish what is queued, stop the thread."""
        self.accepting = False
        self.executor.close()

    def store(self, name: str | None = None) -> Store:
        """The store of backend ``name`` (default: ``settings.storage``, where
        ``output_oss`` uploads), made once."""
        name = name or self.settings.storage
        if name not in self._stores:
            self._stores[name] = open_store(name, self.settings)
        return self._stores[name]

    def fetcher(self) -> Any:
        """Reads image inputs; ``oss://`` and ``s3://`` only where configured."""
        if self._fetcher is None:
            from .inputs import ImageFetcher
            s = self.settings
            self._fetcher = ImageFetcher(
                s, self.comfy.input_dir,
                self.store("oss") if s.oss_bucket or s.oss_endpoint else None,
                s3_store=self.store("s3") if s.s3_bucket or s.s3_endpoint or s.storage == "s3" else None,
                on_fetched=self.metrics.image_fetched)
        return self._fetcher

    # ---------------------------------------------------------------- tasks
    def get(self, task_id: str) -> Task | None:
        """The task registered under ``task_id`` (queued, running or recently finished)."""
        return self._tasks.get(task_id)

    async def lookup(self, task_id: str) -> Task | None:
        """:meth:`get`, after waiting for a submit of this id that is still
        being prepared (None if that one was refused)."""
        while (preparing := self._preparing.get(task_id)) is not None:
            await preparing.wait()
        return self._tasks.get(task_id)

    @property
    def idle(self) -> bool:
        """Nothing being prepared, queued or run."""
        return not self._preparing and self.executor.idle

    def add_observer(self, observer: TaskObserver) -> None:
        """Tell ``observer`` of every task accepted from now on."""
        self.observers.append(observer)

    def remove_observer(self, observer: TaskObserver) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    async def submit(self, graph: Any, **options: Any) -> Task:
        """Check, rewrite and validate a workflow, then queue it.

        Raises WorkflowInvalid / ImageInputError / QueueFull / NotAccepting
        before anything is queued. A task id registered here returns that
        task, also while its first submit is still being validated (retries
        are idempotent). Options: ``task_id``, ``output_base64``,
        ``output_oss``, ``credentials``, ``output_format``, ``quality``.

        What follows the run (assembling the result) is spawned in
        :attr:`background`: in the server, the lifespan's task group; in
        :meth:`run`, a group of its own. Called outside any open group, that
        work runs as a loop task the engine tracks: keep the loop running
        until ``task.wait()`` returns (or ``await engine.background.drain()``).
        """
        try:
            return await self._submit(graph, **options)
        except ComfyEmbedError as e:  # refused before queueing: still a task outcome
            self.metrics.task_ended(e.type)
            raise

    async def _submit(self, graph: Any, *, task_id: str | None = None,
                      output_base64: bool = False, output_oss: bool = False,
                      credentials: Any = None, output_format: str | None = None,
                      quality: int | None = None) -> Task:
        report = TaskReport()
        if not self.accepting:
            raise NotAccepting("this instance is draining and accepts no new work")
        await self.wait_ready()
        task_id = task_id or uuid.uuid4().hex
        check_task_id(task_id)
        existing = await self.lookup(task_id)
        if existing is not None:
            return existing
        # The id is reserved until queued or refused (no await since lookup):
        # a retry meanwhile waits in lookup() instead of preparing it twice.
        preparing = self._preparing[task_id] = anyio.Event()
        try:
            task = await self._prepare(graph, report, task_id, output_base64=output_base64,
                                       output_oss=output_oss, credentials=credentials,
                                       output_format=output_format, quality=quality)
        finally:
            del self._preparing[task_id]
            preparing.set()
        self._accepted(task)
        return task

    async def _prepare(self, graph: Any, report: TaskReport, task_id: str, *,
                       output_base64: bool, output_oss: bool, credentials: Any,
                       output_format: str | None, quality: int | None) -> Task:
        """Everything between the id check and the queue; the queued task."""
        if output_format is not None and output_format not in FORMATS:
            raise WorkflowInvalid(f"output_format must be one of png, jpeg, webp; got {output_format!r}",
                                  type="invalid_output_format")
        if quality is not None and not 1 <= quality <= 100:
            raise WorkflowInvalid(f"quality must be 1-100; got {quality}", type="invalid_output_format")
        if output_oss:
            self.store().check()  # a missing setting fails now, before the run
        comfy = self.comfy
        request = self.parse(graph)
        prompt = request.prompt
        seeds = randomize_seeds(prompt, comfy.input_specs)
        isolate_outputs(prompt, task_id)
        try:
            await self._materialise_images(prompt, credentials, task_id)
            await self._fetch_models(prompt)
            prompt_id = str(uuid.uuid4())
            report.mark_prepared()
            checked, outputs = await anyio.to_thread.run_sync(comfy.validate, prompt, prompt_id,
                                                              request.targets)
            report.mark_validated(checked, loader_nodes(checked, comfy.is_loader))
            task = Task(self, task_id, prompt_id, seeds, output_base64=output_base64,
                        output_oss=output_oss, credentials=credentials,
                        output_format=output_format, quality=quality, report=report)
            task.request = request
            job = Job(prompt_id=prompt_id, prompt=checked, outputs=outputs, task_id=task_id,
                      emit=task._from_executor, on_done=task._on_done, on_start=task._on_start,
                      on_position=task._on_position,
                      extra_data=request.extra_data)
            ahead = self.executor.submit(job)  # QueueFull propagates: nothing queued
        except BaseException:
            self.drop_inputs(task_id)  # never queued: its materialised inputs go now
            raise
        task._publish(status_event(ahead + 1))
        if ahead:
            task._publish(queue_event(prompt_id, ahead))
        log.info("task %s queued as prompt %s (%d ahead)", task_id, prompt_id, ahead)
        return task

    def _accepted(self, task: Task) -> None:
        """Register a queued task and tell the observers (no await: the
        executor's first message reaches the loop only after this)."""
        self._remember(task)
        persisted = False
        for observer in list(self.observers):
            try:
                persisted = observer.task_accepted(task) or persisted
            except Exception:
                log.exception("task %s: observer %r failed", task.task_id, observer)
        if not persisted:
            task.final_durable.set()  # nothing writes it anywhere: as durable as it gets

    def parse(self, body: Any) -> WorkflowRequest:
        """The request (bare graph or native envelope), after the on-prompt
        handlers of custom-node packs, as native ``POST /prompt`` runs them."""
        comfy = self.comfy
        body = copy.deepcopy(body) if isinstance(body, dict) else body
        server = getattr(comfy, "server", None)  # a test fake has none
        handlers = getattr(server, "on_prompt_handlers", None)
        s = self.settings
        request = parse_request(body, server.trigger_on_prompt if handlers else None,
                                max_depth=s.max_json_depth)
        check_nodes(request.prompt, max_nodes=s.max_nodes, denylist=s.node_denylist)
        return request

    def drop_inputs(self, task_id: str) -> None:
        """Delete the inputs materialised for one task (they served its run only)."""
        from .inputs import SUBFOLDER
        if self._comfy is not None and valid_task_id(task_id):
            shutil.rmtree(self._comfy.input_dir / SUBFOLDER / task_id, ignore_errors=True)

    async def _fetch_models(self, prompt: dict[str, Any]) -> None:
        """With ``models_fetch=first_use``: the manifest models this workflow
        names, downloaded (once across instances) before it is validated."""
        s = self.settings
        if not s.models_manifest or s.models_fetch != "first_use":
            return
        from .model_manifest import ensure_referenced, load_manifest
        if self._manifest is None:
            self._manifest = await anyio.to_thread.run_sync(load_manifest, s.models_manifest)
        await anyio.to_thread.run_sync(ensure_referenced, s, self._manifest, prompt)

    async def _materialise_images(self, prompt: dict[str, Any], credentials: Any,
                                  task_id: str | None = None) -> None:
        """Turn upload-type inputs (image, audio, video) given as URLs,
        ``oss://``/``s3://`` or base64 into checked files in the input folder
        (``serverless/<task_id>/``: one caller's inputs out of another's reach)."""
        refs = list(media_inputs(prompt, self.comfy.input_specs))
        if not refs:
            return
        fetcher = self.fetcher()
        errors: list[ImageInputError] = []

        async def one(node_id: str, class_type: str, name: str, value: str, kind: str) -> None:
            try:
                prompt[node_id]["inputs"][name] = await fetcher.materialise(
                    value, credentials, kind=kind, folder=task_id)
            except ImageInputError as e:
                errors.append(e.at(node_id, class_type, name, value))

        async with anyio.create_task_group() as tg:
            for ref in refs:
                tg.start_soon(one, *ref)
        if errors:
            first = errors[0]
            for other in errors[1:]:
                first.node_errors.update(other.node_errors)
            raise first

    def _remember(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        finished = [t for t, v in self._tasks.items() if v.done]
        for t in finished[:max(0, len(finished) - _KEEP_FINISHED)]:
            del self._tasks[t]

    def abandon_results(self) -> None:
        """Shutdown, past its grace: stop assembling the results still in
        flight; each of those tasks ends with a TaskCancelled final event."""
        self.renders.cancel()

    def cancel(self, task_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued or running task of this instance."""
        task = self._tasks.get(task_id)
        if task is None or task.done:
            return False
        return self.executor.cancel(task.prompt_id, reason)

    async def run(self, graph: Any, **options: Any) -> dict[str, Any]:
        """Submit and wait; the final event, or the typed error raised.

        Without an open :attr:`background` group (library use), one is
        opened for this call, so nothing it started outlives it.
        """
        if self.background.attached:
            return await self._run(graph, options)
        failure: Exception | None = None
        async with self.background.open():
            try:
                final = await self._run(graph, options)
            except Exception as e:  # raised outside: a task group would wrap it in a group
                failure = e
        if failure is not None:
            raise failure
        return final

    async def _run(self, graph: Any, options: dict[str, Any]) -> dict[str, Any]:
        task = await self.submit(graph, **options)
        return await task.result()


_shared: Engine | None = None
_shared_lock = threading.Lock()


def shared_engine(settings: Settings | None = None) -> Engine:
    """The process's engine (ComfyUI boots once per process)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Engine(settings).start()
        return _shared


def run_workflow(graph: Any, *, settings: Settings | None = None, **options: Any) -> dict[str, Any]:
    """Run one workflow and return the ``serverless_api`` result message.

    Blocking; boots ComfyUI on first use (``settings`` applies then only).
    Options: ``task_id``, ``output_base64``, ``output_oss``. Raises the typed
    error (WorkflowInvalid, ExecutionFailed, ...) when the run fails. Do not
    call from inside a running event loop: use ``await Engine.run`` there.
    """
    engine = shared_engine(settings)
    return anyio.run(lambda: engine.run(graph, **options))
