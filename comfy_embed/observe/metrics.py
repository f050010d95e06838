"""Prometheus metrics of one engine: the only module that imports prometheus-client.

Each :class:`Metrics` has its own registry (no process-global state), so an
engine per test, or two engines in one process, do not mix their figures.
Label values are bounded: an error ``type`` (a code-defined string, never
user input), an input's source, a loader node's class name.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Collection, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from comfy_embed.observe.memory import vram_bytes

__all__ = ["Metrics", "CONTENT_TYPE"]

#: The ``Content-Type`` of :meth:`Metrics.render_text`.
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds from a 64x64 image on CPU (tens of ms) to a long video job (minutes).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Task-log writes: a page-cache write to an fsync on a network filesystem.
_WRITE_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SOURCES = frozenset({"url", "oss", "s3", "base64"})


def _bounded(value: str | None, default: str = "other") -> str:
    """A label value that cannot grow the series count without bound."""
    return value if value and _LABEL.fullmatch(value) else default


class _Live(Collector):
    """Figures read at scrape time rather than kept up to date: the queue,
    the executor's busy time, CUDA memory."""

    def __init__(self, queued: Callable[[], int], running: Callable[[], int],
                 busy_seconds: Callable[[], float]) -> None:
        self._queued, self._running, self._busy = queued, running, busy_seconds

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("comfy_embed_tasks_queued",
                                "Tasks waiting for the executor (the running one not counted).",
                                value=self._queued())
        yield GaugeMetricFamily("comfy_embed_tasks_running",
                                "Tasks executing now (0 or 1: one executor thread).",
                                value=self._running())
        yield CounterMetricFamily("comfy_embed_executor_busy_seconds",
                                  "Seconds the executor thread spent executing graphs.",
                                  value=self._busy())
        vram = vram_bytes()
        if vram is not None:
            yield GaugeMetricFamily("comfy_embed_cuda_memory_allocated_bytes",
                                    "CUDA memory held by tensors.", value=vram[0])
            yield GaugeMetricFamily("comfy_embed_cuda_memory_reserved_bytes",
                                    "CUDA memory reserved by the caching allocator.", value=vram[1])


class _Models(Collector):
    """The models loaded now (one series per model, read at scrape time from
    a tuple the executor thread replaces after each run) and the kept models
    released under memory pressure."""

    def __init__(self, loaded: Callable[[], tuple[str, ...]], kept: Collection[str],
                 evictions: Callable[[], int]) -> None:
        self._loaded, self._kept, self._evictions = loaded, kept, evictions

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily("comfy_embed_model_loaded",
                                  "Models loaded on this instance (1 each, as of the last run's "
                                  "end); kept: named in COMFY_EMBED_KEEP_LOADED.",
                                  labels=["model", "kept"])
        for name in self._loaded():
            gauge.add_metric([name[:256], "true" if name in self._kept else "false"], 1)
        yield gauge
        yield CounterMetricFamily("comfy_embed_kept_model_evictions",
                                  "Kept models released under memory pressure.",
                                  value=self._evictions())


class Metrics:
    """The metrics of one engine; :meth:`render_text` gives the exposition text.

    Counters and histograms are updated by the engine (see the method docs);
    queue depth, running tasks and busy seconds are read at scrape time from
    the callables given to :meth:`bind_executor`.
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux).
        ProcessCollector(registry=r)
        self.tasks = Counter("comfy_embed_tasks", "Tasks ended, by status and error type.",
                             ["status", "error_type"], registry=r)
        self.queue_wait = Histogram("comfy_embed_queue_wait_seconds",
                                    "Seconds a task waited in the queue.", buckets=_SECONDS,
                                    registry=r)
        self.execution = Histogram("comfy_embed_execution_seconds",
                                   "Seconds ComfyUI spent executing a task's graph.",
                                   buckets=_SECONDS, registry=r)
        self.eta_error = Histogram("comfy_embed_eta_error_seconds",
                                   "|estimated - actual| execution seconds of a task the ETA "
                                   "had an estimate for.", buckets=_SECONDS, registry=r)
        self.end_to_end = Histogram("comfy_embed_task_end_to_end_seconds",
                                    "Seconds from submission to the final event.",
                                    buckets=_SECONDS, registry=r)
        self.render = Histogram("comfy_embed_render_seconds",
                                "Seconds turning outputs into results (re-encode, base64, upload).",
                                buckets=_SECONDS, registry=r)
        self.upload = Histogram("comfy_embed_upload_seconds",
                                "Seconds uploading a task's outputs to object storage.",
                                buckets=_SECONDS, registry=r)
        self.task_log_write = Histogram("comfy_embed_task_log_write_seconds",
                                        "Seconds per write of events to the shared task log.",
                                        buckets=_WRITE_SECONDS, registry=r)
        self.model_loads = Counter("comfy_embed_model_loads",
                                   "Loader nodes executed (a model read from disk).",
                                   ["loader"], registry=r)
        self.model_cache_hits = Counter("comfy_embed_model_cache_hits",
                                        "Loader nodes answered from ComfyUI's cache (model resident).",
                                        ["loader"], registry=r)
        self.model_load_seconds = Histogram("comfy_embed_model_load_seconds",
                                            "Seconds a loader node took.", buckets=_SECONDS,
                                            registry=r)
        self.input_bytes = Counter("comfy_embed_input_bytes",
                                   "Bytes of media inputs (images, audio, video) fetched or "
                                   "decoded, by source.", ["source"], registry=r)
        self.inputs = Counter("comfy_embed_inputs_fetched",
                              "Media inputs fetched or decoded, by source.", ["source"], registry=r)
        # Every outcome series from the start, so rate() sees the first one.
        self.tasks.labels("success", "none")

    def bind_executor(self, queued: Callable[[], int], running: Callable[[], int],
                      busy_seconds: Callable[[], float]) -> None:
        """Read these at each scrape (they must be cheap and thread-safe)."""
        self.registry.register(_Live(queued, running, busy_seconds))

    def bind_models(self, loaded: Callable[[], tuple[str, ...]], kept: Collection[str],
                    evictions: Callable[[], int]) -> None:
        """The loaded models' gauge (model label: file names on this instance's
        disk, a bounded set) and the kept models' evictions, read at each scrape."""
        self.registry.register(_Models(loaded, kept, evictions))

    # ------------------------------------------------------------ updates
    def task_ended(self, error_type: str | None) -> None:
        """One task ended: ``error_type`` None for success."""
        if error_type is None:
            self.tasks.labels("success", "none").inc()
        else:
            self.tasks.labels("error", _bounded(error_type)).inc()

    def image_fetched(self, source: str, size: int) -> None:
        """A media input of ``size`` bytes read from ``source`` (url, oss, s3, base64)."""
        source = source if source in _SOURCES else "other"
        self.inputs.labels(source).inc()
        self.input_bytes.labels(source).inc(size)

    def model_loaded(self, loader: str, seconds: float) -> None:
        self.model_loads.labels(_bounded(loader)).inc()
        self.model_load_seconds.observe(seconds)

    def model_resident(self, loader: str) -> None:
        self.model_cache_hits.labels(_bounded(loader)).inc()

    def task_report(self, report: dict[str, Any]) -> None:
        """Fold one finished task's report (see :mod:`comfy_embed.observe.report`) into
        the histograms and the model counters."""
        self.queue_wait.observe(report["queued"])
        if report["execution"]:
            self.execution.observe(report["execution"])
            if report.get("estimate") is not None:  # comfy_embed.eta's, as admitted
                self.eta_error.observe(abs(report["estimate"] - report["execution"]))
        if report["render"]:
            self.render.observe(report["render"])
        if report["upload"]:
            self.upload.observe(report["upload"])
        self.end_to_end.observe(report["end_to_end"])
        models = report["models"]
        for entry in models["loaded"]:
            self.model_loaded(entry["class_type"], entry["seconds"])
        for entry in models["resident"]:
            self.model_resident(entry["class_type"])

    # ------------------------------------------------------------ output
    def render_text(self) -> bytes:
        """The exposition text (``Content-Type``: :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
