"""The per-task report: where a task's time and memory went.

Filled in as the task moves (submit on the event loop, execution on the
executor thread, results back on the loop) and frozen into the final event's
``data.report``. Phases share their boundaries, so ``prepare + validation +
queued + execution + handoff + render`` is the end-to-end time less the few
statements that build the final event. ``handoff`` is the wait of the
finished run for the event loop (well under a millisecond on an idle
machine; a busy loop or CPU shows here). All times are seconds from
``time.perf_counter``.

Thread use: the executor-thread methods (:meth:`started`, :meth:`on_event`,
:meth:`executed`) run before the hand-off to the loop that calls
:meth:`finish`, so no lock is needed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from comfy_embed.observe import memory

__all__ = ["TaskReport", "TimedUploader", "loader_nodes"]

log = logging.getLogger(__name__)
_clock = time.perf_counter


def loader_nodes(prompt: dict[str, Any], is_loader: Any) -> dict[str, tuple[str, str | None]]:
    """``{node_id: (class_type, model name)}`` for the loader nodes of a prompt.

    The model name is the first ``*_name`` input that is a string
    (``ckpt_name``, ``vae_name``, ``lora_name``, ...).
    """
    out: dict[str, tuple[str, str | None]] = {}
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str) or not is_loader(class_type):
            continue
        inputs = node.get("inputs") or {}
        name = next((v for k, v in inputs.items() if k.endswith("_name") and isinstance(v, str)), None)
        out[node_id] = (class_type, name)
    return out


class TaskReport:
    """Marks and samples of one task; :meth:`finish` gives the report dict."""

    def __init__(self) -> None:
        self.submitted = _clock()
        self.prepared: float | None = None
        self.validated: float | None = None
        self.started_at: float | None = None
        self.executed_at: float | None = None
        self.render_start: float | None = None
        self.render_end: float | None = None
        self.upload_start: float | None = None
        self.upload_end: float | None = None
        self.class_types: dict[str, str] = {}
        self.loaders: dict[str, tuple[str, str | None]] = {}
        #: (node id, seconds) in execution order.
        self.nodes: list[tuple[str, float]] = []
        self.cached: list[str] = []
        self._node: str | None = None
        self._node_start = 0.0
        self._peak_reset = False
        self.peak_rss: int | None = None
        self.peak_vram: int | None = None
        #: The run record (comfy_embed.environment.drift.Fingerprint.record):
        #: ComfyUI's commit, packs, model hashes, torch, device, the lock. Made
        #: by ``environment_source`` on the executor thread as the run starts
        #: (hashing a model file seen for the first time is done there, not
        #: on the event loop nor before the task is queued).
        self.environment: dict[str, Any] | None = None
        self.environment_source: Callable[[], dict[str, Any]] | None = None
        #: ``?replay=``: what this run replays and how the environment differs.
        self.replay: dict[str, Any] | None = None
        #: The workflow's shape and the execution seconds the ETA expected of
        #: it (comfy_embed.eta): a later boot learns from the shape's ``execution``.
        self.shape: str | None = None
        self.estimate: float | None = None
        #: COMFY_EMBED_KEEP_LOADED's names; the kept models released under
        #: memory pressure since the job before this one (set as it starts).
        self.kept: frozenset[str] = frozenset()
        self.evicted: list[str] = []

    # ----------------------------------------------------- event loop: submit
    def mark_prepared(self) -> None:
        """Parsing, seeds and image inputs done."""
        self.prepared = _clock()

    def mark_validated(self, prompt: dict[str, Any],
                       loaders: dict[str, tuple[str, str | None]]) -> None:
        """ComfyUI's validation done; the task is about to be queued."""
        self.validated = _clock()
        self.class_types = {k: v.get("class_type", "") for k, v in prompt.items()
                            if isinstance(v, dict)}
        self.loaders = loaders

    # -------------------------------------------------------- executor thread
    def started(self) -> None:
        self.started_at = _clock()
        if self.environment_source is not None:
            try:
                self.environment = self.environment_source()
            except Exception:  # a record is never worth failing a run
                log.exception("the run record could not be made")
        self._peak_reset = memory.reset_peak_rss()
        memory.reset_peak_vram()

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """Every ComfyUI message of the run, as it is sent."""
        if kind == "executing":
            now = _clock()
            self._close_node(now)
            node = data.get("node")
            if node is not None:
                self._node, self._node_start = str(node), now
        elif kind == "execution_cached":
            self.cached = [str(n) for n in data.get("nodes") or ()]

    def executed(self) -> None:
        self.executed_at = now = _clock()
        self._close_node(now)
        self.peak_rss = memory.peak_rss_bytes() if self._peak_reset else memory.rss_bytes()
        self.peak_vram = memory.peak_vram_bytes()

    def _close_node(self, now: float) -> None:
        if self._node is not None:
            self.nodes.append((self._node, now - self._node_start))
            self._node = None

    # ----------------------------------------------------- event loop: results
    def mark_render(self, end: bool = False) -> None:
        if end:
            self.render_end = _clock()
        else:
            self.render_start = _clock()

    def mark_upload(self, start: float, end: float) -> None:
        """One upload ran from ``start`` to ``end``; uploads overlap, so the
        report gives the span from the first start to the last end."""
        self.upload_start = start if self.upload_start is None else min(self.upload_start, start)
        self.upload_end = end if self.upload_end is None else max(self.upload_end, end)

    # -------------------------------------------------------------- the dict
    def finish(self) -> dict[str, Any]:
        """The ``data.report`` object (called once, when the final event is built)."""
        end = _clock()
        # A phase that never began (validation failed, cancelled while queued)
        # has no time; the next phase starts where the last one reached.
        queued_from = self.validated
        queued_to = self.started_at
        if queued_to is None and queued_from is not None:
            queued_to = end  # cancelled or failed while waiting
        report: dict[str, Any] = {
            "prepare": _span(self.submitted, self.prepared),
            "validation": _span(self.prepared, self.validated),
            "queued": _span(queued_from, queued_to),
            "execution": _span(self.started_at, self.executed_at),
            "handoff": _span(self.executed_at, self.render_start or end),
            "render": _span(self.render_start, self.render_end),
            "upload": _span(self.upload_start, self.upload_end),
            "end_to_end": round(end - self.submitted, 6),
            "nodes": [{"node": n, "class_type": self.class_types.get(n), "seconds": round(s, 6)}
                      for n, s in self.nodes],
            "cached_nodes": self.cached,
            "models": self._models(),
            "peak_rss_bytes": self.peak_rss,
            "peak_vram_bytes": self.peak_vram,
        }
        if self.shape is not None:
            report["shape"] = self.shape
            report["estimate"] = None if self.estimate is None else round(self.estimate, 6)
        if self.environment is not None:
            report["environment"] = self.environment
            if self.replay is not None:
                self.environment["replay"] = self.replay
        return report

    def _models(self) -> dict[str, list[Any]]:
        """Each loader node: ``loaded`` (it ran: read from disk) or
        ``resident`` (answered from ComfyUI's cache), ``kept`` true where
        COMFY_EMBED_KEEP_LOADED names its model; ``evicted``: the kept models
        released under memory pressure since the job before this one."""
        times = dict(self.nodes)
        loaded, resident = [], []
        for node_id, (class_type, name) in self.loaders.items():
            entry: dict[str, Any] = {"node": node_id, "class_type": class_type, "name": name,
                                     "kept": name in self.kept}
            if node_id in times:
                loaded.append({**entry, "seconds": round(times[node_id], 6)})
            elif node_id in self.cached:
                resident.append(entry)
        return {"loaded": loaded, "resident": resident, "evicted": list(self.evicted)}


def _span(start: float | None, end: float | None) -> float:
    return round(end - start, 6) if start is not None and end is not None else 0.0


class TimedUploader:
    """An uploader (see :class:`comfy_embed.results.Uploader`) that tells the
    report when each upload ran; everything else passes through."""

    def __init__(self, store: Any, report: TaskReport) -> None:
        self._store = store
        self._report = report

    async def upload(self, *args: Any, **kwargs: Any) -> Any:
        start = _clock()
        try:
            return await self._store.upload(*args, **kwargs)
        finally:
            self._report.mark_upload(start, _clock())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
