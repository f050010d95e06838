"""The async facade over the executor thread: submit, stream, await, cancel.

A :class:`~.tasks.Task` (in :mod:`comfy_embed.tasks`) lives in the event
loop that submitted it. The executor thread
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
   service's task-log writer) answers True and sets ``Task.final_written``
   once the final event is in the task log; with none, the engine sets it
   at once.
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

import collections
import functools
import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio

from comfy_embed._comfy.comfy import Comfy
from comfy_embed.background import Background
from comfy_embed.config import Settings
from comfy_embed.environment.drift import Fingerprint, instance_environment
from comfy_embed.errors import ComfyEmbedError, NotAccepting, WorkflowInvalid
from comfy_embed.eta import Estimator, Eta
from comfy_embed.events import queue_event, status_event
from comfy_embed.executor import Executor, Job
from comfy_embed.observe.guard import MemoryGuard
from comfy_embed.observe.metrics import Metrics
from comfy_embed.observe.report import TaskReport
from comfy_embed.prepare.options import DEFAULT_OPTIONS, RunOptions
from comfy_embed.prepare.pipeline import Preparer, WriteGate
from comfy_embed.results import FORMATS
from comfy_embed.scheduling import Quota, Quotas
from comfy_embed.startup import boot_comfy
from comfy_embed.storage import Store, open_store
from comfy_embed.taskid import check_task_id, valid_task_id
from comfy_embed.tasks import Task, TaskObserver
from comfy_embed.variants import attach_variants, check_variants
from comfy_embed.watchdog import Watchdog

if TYPE_CHECKING:
    from comfy_embed.inputs.models import FirstUse

log = logging.getLogger(__name__)

__all__ = ["Engine", "RunOptions", "Task", "TaskObserver", "run_workflow"]

#: Finished tasks kept in memory for late readers (the task log keeps all;
#: a final event can hold megabytes of base64, so keep few).
_KEEP_FINISHED = 4


class Engine:
    """ComfyUI in this process, behind one executor thread.

    ``start()`` boots ComfyUI on the executor thread in the background;
    ``await wait_ready()`` (or ``ready``) tells when it can run work, and
    raises NotAccepting if the boot failed (the message says why: no ComfyUI
    at ``comfyui_dir`` names COMFY_EMBED_COMFYUI_DIR and ``comfy-embed
    install-comfyui``). ``await submit(graph, RunOptions(...))`` returns a
    :class:`Task` (``stream()``, ``await result()``, ``cancel()``) or raises
    what :func:`run_workflow` raises for a refused request (WorkflowInvalid,
    ImageInputError, PayloadTooLarge, QueueFull, NotAccepting); ``await
    task.result()`` raises the run's error (ExecutionFailed, TaskCancelled,
    RunTimeout, StorageError...). ``close()`` stops the executor.
    """

    def __init__(self, settings: Settings | None = None,
                 boot: Callable[[Settings], Comfy] | None = None) -> None:
        self.settings = settings or Settings.from_env()
        #: Builds the backend on the executor thread (a fake stands in only
        #: in tests of the thread, queue and API mechanics).
        self._boot_backend = boot or boot_comfy
        jobs = self.settings.jobs
        quotas = Quotas.parse(Quota(jobs.key_queue, jobs.key_running), jobs.key_quotas)
        self.executor = Executor(self._boot, jobs.max_queue, quotas, fair=jobs.fair_share)
        self.metrics = Metrics()
        ex = self.executor
        self.metrics.bind_executor(lambda: ex.waiting, lambda: ex.running,
                                   lambda: ex.busy_seconds)
        self._comfy: Comfy | None = None
        self.metrics.bind_models(lambda: self.loaded_models, self.settings.comfy.keep_loaded,
                                 lambda: getattr(getattr(self._comfy, "kept", None),
                                                 "evictions", 0))
        #: The instance's environment and its drift from the lock (set at boot).
        self.fingerprint: Fingerprint | None = None
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
        #: Ids (tasks, dry runs) with inputs materialised under ``input/serverless/``.
        self._materialised: set[str] = set()
        self._stores: dict[str, Store] = {}
        self._fetcher: Any = None
        self._preparer: Preparer | None = None
        self._manifest: FirstUse | None = None
        #: Events of :meth:`wait_idle` callers, set when a job ends or a
        #: preparation does (each caller's own: the engine may serve several loops in turn).
        self._idle_waiters: set[anyio.Event] = set()
        self.accepting = True
        self._started = False
        self._lock = threading.Lock()
        #: Watermarks, the OOM policy and gc between jobs (on the executor thread).
        self.guard = MemoryGuard(self.settings, self._free_cache, self._recycle,
                                 self._release_kept)
        self.executor.housekeeper = self.guard
        stall = self.settings.jobs.stall_seconds  # interrupts a silent job (watchdog.py)
        self.watchdog = Watchdog(self.executor, stall, self.guard.trip) if stall else None
        #: The measured ETA and deadline admission (learns from every run).
        self.eta = Eta(self.executor, Estimator(self.settings.jobs.eta_window,
                                                self.settings.jobs.eta_fallback))
        self.executor.on_executed = self.eta.learn

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
        writer = getattr(comfy, "writer", None)
        if writer is not None and not self.settings.comfy.encode_when_idle:
            # Hand encoding off only when other work is about (a job queued or
            # being prepared, files of another being written): alone, the
            # executor encodes itself, as natively (no hand-off on its path).
            ex = self.executor
            writer.busy = lambda: bool(ex.waiting or ex.writing or any(
                t != ex.current_task_id for t in self._preparing))  # its own is no other
        self._fingerprint(comfy)
        self._comfy = comfy
        return comfy

    def _fingerprint(self, comfy: Comfy) -> None:
        """The environment, compared with the lock before /ready (a lock that
        cannot be read fails the boot). A stand-in backend (the thread and
        queue unit tests) may lack packs and model folders."""
        packs = getattr(comfy, "packs", [])
        loaded = {p.name: p.error for p in packs} if self.settings.comfy.custom_nodes else None
        self.fingerprint = instance_environment(self.settings, loaded,
                                                str(getattr(comfy, "device", "cpu")))
        if not hasattr(comfy, "model_files"):
            return
        folders = sorted(comfy.model_files())

        def locate(name: str) -> list[tuple[str, Path]]:
            found = ((f, comfy.model_path(f, name)) for f in folders)
            return [(f"{f}/{name}", Path(p)) for f, p in found if p]

        self.fingerprint.locate = locate

    @property
    def ready(self) -> bool:
        return self.executor.ready.is_set() and self.executor.boot_error is None

    def custom_nodes(self) -> dict[str, Any] | None:
        """Custom-node packs found at boot: ``{"loaded": [...], "failed":
        {name: error}}``; None when custom nodes are off or not booted."""
        if not self.settings.comfy.custom_nodes or self._comfy is None:
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

    def _release_kept(self, reason: str) -> list[str]:
        release = getattr(self._comfy, "release_kept", None)  # a test fake has none
        return release(reason) if release is not None else []

    @property
    def loaded_models(self) -> tuple[str, ...]:
        """The models loaded on this instance (as of the last run's end):
        ``/ready``, ``X-Loaded-Models``, ``/metrics``. Cheap, any thread."""
        return getattr(self._comfy, "loaded_models", ())

    def _job_starts(self, task: Task) -> None:
        """A job leaves the queue (executor thread): its report names the
        kept models released under pressure since the last job."""
        kept = getattr(self._comfy, "kept", None)
        if kept is not None:
            task.report.kept, task.report.evicted = kept.names, kept.take_evicted()
        task._on_start()

    def _recycle(self, reason: str) -> None:
        """The memory guard tripped: accept nothing more (``/ready`` says
        draining); the server drains and exits (see ``guard.EXIT_RECYCLE``)."""
        self.accepting = False

    def close(self) -> None:
        """Stop accepting work, finish what is queued, stop the thread."""
        self.accepting = False
        if self.watchdog is not None:
            self.watchdog.stop()
        self.executor.close()

    def store(self, name: str | None = None) -> Store:
        """The store of backend ``name`` (default: ``settings.store.backend``, where
        ``output_oss`` uploads), made once."""
        name = name or self.settings.store.backend
        if name not in self._stores:
            self._stores[name] = open_store(name, self.settings)
        return self._stores[name]

    def fetcher(self) -> Any:
        """Reads image inputs; ``oss://`` and ``s3://`` only where configured."""
        if self._fetcher is None:
            from comfy_embed.inputs.fetch import ImageFetcher
            from comfy_embed.storage import input_readers
            s, store = self.settings, self.settings.store
            self._fetcher = ImageFetcher(
                s, self.comfy.input_dir, input_readers(
                    s, oss=self.store("oss") if store.oss_bucket or store.oss_endpoint else None,
                    s3=self.store("s3") if store.s3_bucket or store.s3_endpoint
                    or store.backend == "s3" else None),
                on_fetched=self.metrics.image_fetched)
            self.background.on_close(self._fetcher.aclose)  # its HTTP client, per loop
        return self._fetcher

    # ---------------------------------------------------------------- tasks
    def get(self, task_id: str) -> Task | None:
        """The task registered under ``task_id`` (queued, running or recently finished)."""
        return self._tasks.get(task_id)

    def forget(self, task_id: str) -> None:
        """Drop a finished task from the registry (deleted: its results must
        not outlive it in memory); a running one stays."""
        task = self._tasks.get(task_id)
        if task is not None and task.done:
            del self._tasks[task_id]

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

    async def wait_idle(self) -> None:
        """Wait until :attr:`idle` (woken when a job ends or a preparation
        does, never by a timer)."""
        while not self.idle:
            # Made and registered with no await since the check: a wake-up
            # (always on the loop) cannot fall between the two.
            woken = anyio.Event()
            self._idle_waiters.add(woken)
            try:
                await woken.wait()
            finally:
                self._idle_waiters.discard(woken)

    def job_ended(self) -> None:
        """A task's job left the executor (called on the loop): wake :meth:`wait_idle`."""
        self._tell_activity()

    def _tell_activity(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, set()
        for woken in waiters:
            woken.set()

    def add_observer(self, observer: TaskObserver) -> None:
        """Tell ``observer`` of every task accepted from now on."""
        self.observers.append(observer)

    def remove_observer(self, observer: TaskObserver) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    async def submit(self, graph: Any, options: RunOptions = DEFAULT_OPTIONS, *,
                     task_id: str | None = None,
                     before_writes: Callable[[], Awaitable[None]] | None = None) -> Task:
        """Check, rewrite and validate a workflow, then queue it.

        Raises WorkflowInvalid / ImageInputError / QueueFull / NotAccepting
        before anything is queued. A task id registered here returns that
        task, also while its first submit is still being validated (retries
        are idempotent). ``before_writes`` is awaited once, before anything
        is written for this task id (its materialised inputs) and before it
        is queued, while parsing and validating need not wait for it;
        raising there refuses the task (the service claims the id in the
        task log meanwhile).

        What follows the run (assembling the result) is spawned in
        :attr:`background`: in the server, the lifespan's task group; in
        :meth:`run`, a group of its own. Called outside any open group, that
        work runs as a loop task the engine tracks: keep the loop running
        until ``task.wait()`` returns (or ``await engine.background.drain()``).
        """
        try:
            return await self._submit(graph, options, task_id, before_writes)
        except ComfyEmbedError as e:  # refused before queueing: still a task outcome
            self.metrics.task_ended(e.type)
            raise

    async def _submit(self, graph: Any, options: RunOptions, task_id: str | None,
                      before_writes: Callable[[], Awaitable[None]] | None) -> Task:
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
            task = await self._queue(graph, options, task_id, WriteGate(before_writes), report)
        finally:
            del self._preparing[task_id]
            preparing.set()
            self._tell_activity()
        self._accepted(task)
        return task

    async def _queue(self, graph: Any, options: RunOptions, task_id: str, gate: WriteGate,
                     report: TaskReport) -> Task:
        """Everything between the id check and the queue; the queued task."""
        self._check_options(options)
        try:
            prepared = await self.preparer.prepare(graph, task_id, options.credentials, gate,
                                                   report, asset_owner=options.asset_owner)
            if self.fingerprint is not None and self.settings.observe.task_report:
                report.environment_source = functools.partial(self.fingerprint.record,
                                                              prepared.checked)
            task = Task(self, task_id, prepared.prompt_id, prepared.seeds, options, report=report)
            task.request = request = prepared.request
            task.resolved_graph = prepared.checked
            job = Job(prompt_id=prepared.prompt_id, prompt=prepared.checked,
                      outputs=prepared.outputs, task_id=task_id, emit=task._from_executor,
                      on_done=task._on_done, on_start=functools.partial(self._job_starts, task),
                      on_position=task._on_position, extra_data=request.extra_data,
                      key=options.key)
            task.variants = attach_variants(job, options.variants, self.preparer.nodes.input_specs,
                                            self.settings)  # ?variants=N: N runs in this job
            task.seeds = task.variants.variants[0].seeds if task.variants else task.seeds
            job.shape = prepared.shape
            task.forecast = self.eta.admit(job, options, report)  # DeadlineUnmeetable
            await gate.open()
            ahead = self.executor.submit(job)  # QueueFull propagates: nothing queued
        except BaseException:
            # Never queued: the inputs this request materialised go now. Not
            # when the gate refused: the id may be another instance's task,
            # whose inputs (on a shared volume) are in that folder.
            if gate.passed:
                self.drop_inputs(task_id)
            raise
        # ComfyUI's count of all work left (under fair share a new job need not be last).
        task._publish(status_event(self.executor.queue_remaining))
        if ahead:
            task._publish(queue_event(prepared.prompt_id, ahead, task.eta_fields()))
        log.info("task %s queued as prompt %s (%d ahead)", task_id, prepared.prompt_id, ahead)
        return task

    def _check_options(self, options: RunOptions) -> None:
        """What no later step would catch before the run: refused now."""
        if options.output_format is not None and options.output_format not in FORMATS:
            raise WorkflowInvalid("output_format must be one of png, jpeg, webp; "
                                  f"got {options.output_format!r}", type="invalid_output_format")
        quality = options.quality
        if quality is not None and not 1 <= quality <= 100:
            raise WorkflowInvalid(f"quality must be 1-100; got {quality}", type="invalid_output_format")
        if options.variants is not None:
            check_variants(options.variants, self.settings.jobs.max_variants)
        if options.output_oss:
            self.store().check()  # a missing setting fails now, before the run

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
            task.final_written.set()  # no task log writes it: the answer need not wait

    @property
    def preparer(self) -> Preparer:
        """The preparation steps (parse, seeds, inputs, validation) over the
        booted ComfyUI; NotAccepting before it is booted."""
        if self._preparer is None:
            comfy = self.comfy
            server = getattr(comfy, "server", None)  # a test fake has none
            s = self.settings
            first_use = bool(s.models.manifest) and s.models.fetch == "first_use"
            self._preparer = Preparer(
                s, comfy, self.fetcher, on_inputs=self._materialised.add,
                on_prompt=getattr(server, "trigger_on_prompt", None),
                fetch_models=self._fetch_models if first_use else None)
        return self._preparer

    def drop_inputs(self, task_id: str) -> None:
        """Delete the inputs materialised for one task (they served its run only)."""
        if task_id not in self._materialised:
            return  # most tasks have none: no filesystem call at every task's end
        self._materialised.discard(task_id)
        from comfy_embed.inputs.fetch import SUBFOLDER
        if self._comfy is not None and valid_task_id(task_id):
            shutil.rmtree(self._comfy.input_dir / SUBFOLDER / task_id, ignore_errors=True)

    async def _fetch_models(self, prompt: dict[str, Any]) -> None:
        """With ``models_fetch=first_use``: the manifest models this workflow
        names, downloaded (once across instances) before it is validated."""
        from comfy_embed.inputs.models import FirstUse, load_manifest
        s = self.settings
        path = s.models.manifest
        if path is None:  # the preparer asks only when a manifest is set
            return
        if self._manifest is None:
            self._manifest = FirstUse(s, await anyio.to_thread.run_sync(load_manifest, path))
        await self._manifest.ensure(prompt)

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

    async def run(self, graph: Any, options: RunOptions = DEFAULT_OPTIONS, *,
                  task_id: str | None = None) -> dict[str, Any]:
        """Submit and wait; the final event, or the typed error raised.

        Without an open :attr:`background` group (library use), one is
        opened for this call, so nothing it started outlives it.
        """
        if self.background.attached:
            return await self._run(graph, options, task_id)
        async with self.background.open():
            return await self._run(graph, options, task_id)

    async def _run(self, graph: Any, options: RunOptions, task_id: str | None) -> dict[str, Any]:
        task = await self.submit(graph, options, task_id=task_id)
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


def run_workflow(graph: Any, *, settings: Settings | None = None, task_id: str | None = None,
                 **options: Any) -> dict[str, Any]:
    """Run one workflow and return the ``serverless_api`` result message.

    Blocking; boots ComfyUI on first use (``settings`` applies then only).
    ``options`` are :class:`RunOptions`' fields (``output_base64``,
    ``output_oss``, ``output_format``, ``quality``, ``credentials``): the
    library's edge, where they become one RunOptions (an unknown name is a
    TypeError). Do not call from inside a running event loop: use
    ``await Engine.run`` there.

    Raises a :class:`~comfy_embed.errors.ComfyEmbedError` subclass, whose
    ``type``, ``message`` and ``node_errors`` are the final message's
    ``data.error``: WorkflowInvalid (not a runnable graph: node and input
    named), ImageInputError / InputPathInvalid / MissingAsset (an unusable
    media input), PayloadTooLarge, QueueFull, NotAccepting (ComfyUI failed to
    boot, e.g. no ComfyUI at ``comfyui_dir``: the message names
    COMFY_EMBED_COMFYUI_DIR and ``comfy-embed install-comfyui``; or draining),
    ExecutionFailed / OutOfMemory (a node failed), TaskCancelled, RunTimeout,
    StorageError (an upload).
    """
    engine = shared_engine(settings)
    run_options = RunOptions(**options)
    return anyio.run(lambda: engine.run(graph, run_options, task_id=task_id))
