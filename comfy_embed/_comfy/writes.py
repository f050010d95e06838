"""Output images encoded off the executor thread (issue 30).

Native ComfyUI compresses every PNG of SaveImage on its one executor thread
(about 100 ms for a textured 1024x1024 image), so the GPU it feeds idles
meanwhile. Here, while an output node of :data:`DEFERRED_NODES` runs on the
executor thread, its ``PIL.Image.Image.save(path, ...)`` calls into the
output or temp folder do not encode: the file is created empty at once (so
``folder_paths.get_save_image_path`` counts it and the next job picks the
next name, as natively), and the very same ``save`` call, with the same
image and arguments, runs in a bounded pool of threads (into a hidden file
beside it, then renamed over it). The bytes are
Pillow's, as natively; only the thread differs.

The node's UI output (file names, subfolder, type) is what it returns
natively; the run's :class:`Outcome` carries one :class:`PendingWrite` per
deferred file, and the executor answers the job once they are all written.
A full backlog makes the executor thread wait for a slot (bounded memory).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
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
    if writer is None or not isinstance(fp, (str, os.PathLike)) or not writer.owns(fp):
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

    def __init__(self, workers: int, backlog: int, folders: Callable[[], list[Path]]) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="comfy-encode",
                                        initializer=_yield_to_executor)
        self._slots = threading.BoundedSemaphore(backlog)
        self._folders = folders
        self._writes: list[PendingWrite] = []
        self._node: tuple[str, str] | None = None
        _patch_pillow()

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
        try:
            future = self._pool.submit(_write, image, path, format, params)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda f: self._slots.release())
        self._writes.append(PendingWrite(node_id, node_type, path, future))

    # --------------------------------------------------------- any thread
    def close(self, wait: bool = True) -> None:
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
    assert _original_save is not None
    part = path.with_name(f".encoding-{secrets.token_hex(4)}-{path.name}")
    try:
        _original_save(image, part, format, **params)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # no empty file left under its name
        raise

