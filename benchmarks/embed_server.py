"""comfy-embed's server with benchmark hooks: ``python server.py`` plus one
extra endpoint, ``GET /_bench/stats``, that the benchmarks read.

Not part of the product. It serves ``comfy_embed.api.create_app`` exactly as
``comfy-embed serve`` does (same uvicorn options, same logging), configured by
the same COMFY_EMBED_* variables; the wrapper only answers its own path.

/_bench/stats answers ``{"busy_seconds", "uptime_seconds", "cuda"}`` from the
engine's executor (busy fraction over a window = delta busy / delta uptime),
and with ``--instrument`` the timeline marks recorded since the last read:
``[[name, perf_counter, task_id], ...]`` (perf_counter is CLOCK_MONOTONIC on
Linux, so the client's clock compares with it). Instrumentation wraps a few
functions of comfy_embed from the outside; marks are keyed by task id, or,
where a function does not see it, by the task id of the latest request
(so the breakdown is exact for one request at a time only).

    COMFY_EMBED_PORT=9000 .venv/bin/python benchmarks/embed_server.py [--instrument]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

MARKS: list[tuple[str, float, str | None]] = []
_current: list[str | None] = [None]


def mark(name: str, key: str | None = None) -> None:
    MARKS.append((name, time.perf_counter(), key if key is not None else _current[0]))


def instrument() -> None:
    """Wrap the request path's stages with marks (before create_app binds them)."""
    import comfy_embed._comfy.comfy as cc
    import comfy_embed.service.lifecycle as sv
    import comfy_embed.tasklog.log as tl
    import comfy_embed.tasks as tk
    from comfy_embed.api.serverless import runs
    from comfy_embed.events import FINAL

    orig_run = runs.run

    async def run(request: Any) -> Any:
        key = request.headers.get("x-task-id")
        _current[0] = key
        mark("req", key)
        try:
            return await orig_run(request)
        finally:
            mark("resp", key)
    runs.run = run  # type: ignore[assignment]

    def sync_span(cls: Any, name: str, label: str, key_arg: int | None = None) -> None:
        orig = getattr(cls, name)

        @functools.wraps(orig)
        def wrapped(self: Any, *a: Any, **kw: Any) -> Any:
            key = a[key_arg] if key_arg is not None else None
            mark(label + "0", key)
            try:
                return orig(self, *a, **kw)
            finally:
                mark(label + "1", key)
        setattr(cls, name, wrapped)

    sync_span(tl.TaskLog, "claim", "claim", 0)
    import comfy_embed.service.blocking as bl
    orig_io_run = bl.BlockingCalls.run

    async def io_run(self: Any, fn: Any, *a: Any) -> Any:
        if not self.inline:
            mark("io_in_thread")  # this call (claim or write) goes to a worker thread
        return await orig_io_run(self, fn, *a)
    bl.BlockingCalls.run = io_run  # type: ignore[method-assign]
    sync_span(tl.TaskLog, "extend", "append", 0)  # one call per flush
    sync_span(cc.Comfy, "validate", "validate")  # graphs over INLINE_VALIDATION_NODES
    orig_validate_here = cc.Comfy.validate_here

    @functools.wraps(orig_validate_here)
    async def validate_here(self: Any, *a: Any, **kw: Any) -> Any:  # on the loop
        mark("validate0")
        try:
            return await orig_validate_here(self, *a, **kw)
        finally:
            mark("validate1")
    cc.Comfy.validate_here = validate_here  # type: ignore[method-assign]
    sync_span(cc.Comfy, "execute", "execute")

    orig_render = tk.render_results

    async def render_results(*a: Any, **kw: Any) -> Any:
        mark("render0")
        try:
            return await orig_render(*a, **kw)
        finally:
            mark("render1")
    tk.render_results = render_results  # type: ignore[assignment]

    orig_publish = tk.Task._publish

    def _publish(self: Any, ev: dict[str, Any]) -> None:
        if ev.get("type") == FINAL and self.final is None:
            mark("final", self.task_id)
        orig_publish(self, ev)
    tk.Task._publish = _publish  # type: ignore[method-assign]

    class _MarkedEvent:
        """Stands in for ``Task.final_written`` (set by LogWriters._persist)."""

        def __init__(self, event: Any, key: str) -> None:
            self._event, self._key = event, key

        def set(self) -> None:
            mark("persisted", self._key)
            self._event.set()

        def is_set(self) -> bool:
            return self._event.is_set()

        async def wait(self) -> None:
            await self._event.wait()

    orig_last_write = sv.LogWriters._last_write

    async def _last_write(self: Any, task: Any, batch: Any) -> Any:
        mark("last_write", task.task_id)
        return await orig_last_write(self, task, batch)
    sv.LogWriters._last_write = _last_write  # type: ignore[method-assign]

    orig_persist = sv.LogWriters._persist

    async def _persist(self: Any, task: Any) -> None:
        task.final_written = _MarkedEvent(task.final_written, task.task_id)
        await orig_persist(self, task)
    sv.LogWriters._persist = _persist  # type: ignore[method-assign]


def bench_app(app: Any) -> Any:
    """``app`` plus GET /_bench/stats."""
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/_bench/stats":
            engine = app.state.engine
            ex = engine.executor
            body = {"busy_seconds": ex.busy_seconds,
                    "uptime_seconds": time.monotonic() - ex.started_at,
                    "marks": list(MARKS), "cuda": common.cuda_memory()}
            MARKS.clear()
            raw = json.dumps(body).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(raw)).encode())]})
            await send({"type": "http.response.body", "body": raw})
            return
        await app(scope, receive, send)
    return asgi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instrument", action="store_true")
    args = ap.parse_args()
    if args.instrument:
        instrument()
    import uvicorn

    from comfy_embed.api import create_app
    from comfy_embed.config import Settings

    # As comfy_embed.cli.main does for `serve`.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    server = settings.server
    uvicorn.run(bench_app(create_app(settings)), host=server.host, port=server.port,
                log_level="info", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
