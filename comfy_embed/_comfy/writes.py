"""Output images encoded off the executor thread (issue 30).

Native ComfyUI compresses every PNG of SaveImage on its one executor thread
(about 100 ms for a textured 1024x1024 image), so the GPU it feeds idles
meanwhile. Here, while an output node of :data:`DEFERRED_NODES` runs on the
executor thread, its ``PIL.Image.Image.save(path, ...)`` calls into the
output or temp folder do not encode: the file is created empty at once (so
``folder_paths.get_save_image_path`` counts it and the next job picks the
next name, as natively), and the very same ``save`` call, with the same
image and arguments, runs in a bounded pool of worker processes (threads
with ``COMFY_EMBED_ENCODE_PROCESSES=0``), into a hidden file beside it, then
renamed over it. The bytes are
Pillow's, as natively; only the thread differs.

The node's UI output (file names, subfolder, type) is what it returns
natively; the run's :class:`Outcome` carries one :class:`PendingWrite` per
deferred file, and the executor answers the job once they are all written.
A full backlog makes the executor thread wait for a slot (bounded memory).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import secrets
import threading
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from pathlib import Path
from typing import Any, Callable

from comfy_embed.outcome import PendingWrite, Sink

log = logging.getLogger(__name__)

__all__ = ["DEFERRED_NODES", "OutputWriter"]

#: Output nodes whose file saves are deferred: ComfyUI's own, whose images
#: are built for the save and never touched after it (their saves then match
#: native byte for byte). A pack node is not deferred: it may read its file
#: back at once.
DEFERRED_NODES = frozenset({"SaveImage", "PreviewImage", "SaveAnimatedWEBP",
                            "SaveAnimatedPNG"})

#: The writer deferring saves on the executor thread, while a deferred node runs.
_active = threading.local()
_original_save: Callable[..., Any] | None = None


def _save(image: Any, fp: Any, format: str | None = None, **params: Any) -> None:
    """``Image.save``, handed to the pool when a deferred node saves a file."""
    writer: OutputWriter | None = getattr(_active, "writer", None)
    assert _original_save is not None
    if (writer is None or not isinstance(fp, (str, os.PathLike)) or not writer.busy()
            or not writer.owns(fp)):
        _original_save(image, fp, format, **params)
        return
    writer.defer(image, Path(fp), format, params)


def _patch_pillow() -> None:
    global _original_save
    from PIL import Image
    if _original_save is None:
        _original_save = Image.Image.save
        Image.Image.save = _save  # type: ignore[method-assign,assignment]


class OutputWriter:
    """The pool and its backlog. ``folders`` are where deferred files may go
    (ComfyUI's output and temp folders)."""

    def __init__(self, workers: int, backlog: int, folders: Callable[[], list[Path]],
                 processes: bool = True) -> None:
        self._workers, self._processes = workers, processes
        #: Started at the first hand-off (a busy server), not at boot: the
        #: workers' imports would slow the cold start on a few cores.
        self._pool: Executor | None = None
        self._pool_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(backlog)
        self._lock = threading.Lock()
        #: Saves not yet handed to the pool (``_dispatch``), and how many it runs.
        self._waiting: collections.deque[tuple[Future[None], tuple[Any, ...]]] = collections.deque()
        self._running = 0
        self._folders = folders
        self._writes: list[PendingWrite] = []
        self._node: tuple[str, str] | None = None
        #: Whether to hand a save off now (the runtime: when a job waits for
        #: the executor); otherwise the executor thread encodes it, as natively.
        self.busy: Callable[[], bool] = lambda: True
        _patch_pillow()

    def _new_pool(self) -> Executor:
        """Processes by default: Pillow holds the GIL while it compresses, so
        an encode thread would slow the executor thread's Python (a GPU's
        kernel launches) and share one core with it. The processes are
        spawned, never forked from this threaded process."""
        if not self._processes:
            return ThreadPoolExecutor(self._workers, thread_name_prefix="comfy-encode",
                                      initializer=_yield_to_executor)
        return ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_yield_to_executor)

    def pool(self) -> Executor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    # ------------------------------------------------- the executor thread
    def watch(self, sink: Sink, prompt: dict[str, Any]) -> Sink:
        """A sink that turns deferring on while a node of DEFERRED_NODES
        runs: from its ``executing`` message to the next message of a node
        (its ``executed``, the next node's ``executing``) or the run's end."""
        self._writes = []

        def forward(kind: str, data: dict) -> None:
            if kind in ("executing", "executed") or kind.startswith("execution_"):
                self._stop()
                node = data.get("node") if kind == "executing" else None
                entry = prompt.get(node) if isinstance(node, str) else None
                class_type = entry.get("class_type") if isinstance(entry, dict) else None
                if class_type in DEFERRED_NODES:
                    self._node = (str(node), str(class_type))
                    _active.writer = self
            sink(kind, data)

        return forward

    def _stop(self) -> None:
        _active.writer = None
        self._node = None

    def finish(self) -> list[PendingWrite]:
        """The run's deferred writes (in the order they were saved)."""
        self._stop()
        writes, self._writes = self._writes, []
        return writes

    def owns(self, fp: str | os.PathLike[str]) -> bool:
        path = os.path.abspath(fp)
        return any(path.startswith(str(folder) + os.sep) for folder in self._folders())

    def defer(self, image: Any, path: Path, format: str | None, params: dict[str, Any]) -> None:
        """Reserve ``path`` (an empty file: the next name counts it) and
        queue the save; waits for a slot when the backlog is full."""
        node_id, node_type = self._node or ("", "")
        path.touch()
        self._slots.acquire()  # back-pressure: the executor waits here
        future: Future[None] = Future()
        future.add_done_callback(lambda f: self._slots.release())
        with self._lock:
            self._waiting.append((future, (image, path, format, params)))
        self._dispatch()
        self._writes.append(PendingWrite(node_id, node_type, path, future))

    # --------------------------------------------------------- any thread
    def _dispatch(self) -> None:
        """Hand waiting saves to the pool, at most one per worker: the pool
        would mark more as running at once, and a cancel could not drop them."""
        while True:
            with self._lock:
                if self._running >= self._workers or not self._waiting:
                    return
                future, args = self._waiting.popleft()
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                self._running += 1
            try:
                inner = self._submit(args)
            except BaseException as e:
                with self._lock:
                    self._running -= 1
                future.set_exception(e)
                continue
            inner.add_done_callback(lambda f, outer=future: self._done(f, outer))  # type: ignore[misc]

    def _submit(self, args: tuple[Any, ...]) -> Future[None]:
        try:
            return self.pool().submit(_write, *args)
        except BrokenExecutor:  # a worker died (killed for memory?): a new pool
            log.error("the output encode pool broke; starting a new one")
            with self._pool_lock:
                self._pool = self._new_pool()
            return self.pool().submit(_write, *args)

    def _done(self, inner: Future[None], outer: Future[None]) -> None:
        with self._lock:
            self._running -= 1
        self._dispatch()  # the next one first: the answer below may take a while
        if inner.cancelled():  # the pool shut down under it
            outer.set_exception(RuntimeError("the encode pool shut down before this file was written"))
        elif (e := inner.exception()) is not None:
            outer.set_exception(e)
        else:
            outer.set_result(None)

    # --------------------------------------------------------- any thread
    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait)


#: How much nicer than the process an encode thread runs (Linux: per thread).
NICENESS = 5


def _yield_to_executor() -> None:
    """Lower this pool thread's CPU priority: where cores are short, the
    executor thread (the GPU's feeder) runs first and encoding takes the rest."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority
        pass


def _write(image: Any, path: Path, format: str | None, params: dict[str, Any]) -> None:
    """Encode beside ``path`` (a hidden name with its extension, which Pillow
    reads the format from), then replace the reserved empty file: a reader
    sees it empty or whole, never half written."""
    # A worker process has Pillow unpatched; a thread calls the original.
    save = _original_save or type(image).save
    part = path.with_name(f".encoding-{secrets.token_hex(4)}-{path.name}")
    try:
        save(image, part, format, **params)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # no empty file left under its name
        raise

