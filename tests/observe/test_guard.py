"""Memory guard: watermarks trip a drain and a distinct exit; OOM policy."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from comfy_embed.config import Settings
from comfy_embed.errors import OutOfMemory
from comfy_embed.executor import Outcome
from comfy_embed.observe.guard import (
    EXIT_RECYCLE,
    MemoryGuard,
    drain_when_tripped,
    is_out_of_memory,
)
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasks import _outcome_error

from tests.conftest import image_only, text_to_image
from tests.servers import Server

OOM = {"node_id": "3", "node_type": "KSampler", "exception_type": "torch.OutOfMemoryError",
       "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_out_of_memory_fails_the_task_with_its_own_type() -> None:
    assert is_out_of_memory(OOM)
    assert is_out_of_memory({"exception_type": "torch.cuda.OutOfMemoryError"})
    assert not is_out_of_memory({"exception_type": "RuntimeError", "exception_message": "boom"})
    error = _outcome_error(Outcome(success=False, interrupted=False, outputs={}, error=dict(OOM)),
                           None)
    assert isinstance(error, OutOfMemory) and error.type == "out_of_memory"
    assert "node 3 (KSampler)" in error.message and "out of memory" in error.message


def test_repeated_ooms_recycle_and_free_cache_each_time(tmp_path: Path) -> None:
    freed: list[int] = []
    trips: list[str] = []
    guard = MemoryGuard(Settings(base_dir=tmp_path, oom_recycle_after=2),
                        lambda: freed.append(1), trips.append)
    guard.after_job(False, OOM)
    assert freed == [1] and not guard.tripped.is_set()
    guard.after_job(True, None)  # a success in between resets the count
    guard.after_job(False, OOM)
    assert freed == [1, 1] and not guard.tripped.is_set()
    guard.after_job(False, OOM)
    assert guard.tripped.is_set() and trips == ["2 out-of-memory errors in a row"]


@pytest.mark.anyio
async def test_a_trip_on_another_thread_wakes_the_drain(tmp_path: Path) -> None:
    """drain_when_tripped waits on the trip itself: woken from the executor's
    thread, no polling; a guard tripped already drains at once."""
    guard = MemoryGuard(Settings(base_dir=tmp_path, oom_recycle_after=1), lambda: None,
                        lambda reason: None)
    drained: list[str] = []

    async def drain() -> None:
        drained.append("drained")

    async def wait() -> None:
        drained.append(await drain_when_tripped(guard, drain))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert drained == [] and len(guard._waiters) == 1
            await anyio.to_thread.run_sync(guard.after_job, False, OOM)
        assert drained == ["drained", "1 out-of-memory errors in a row"]
        assert guard._waiters == []
        assert await drain_when_tripped(guard, drain) == "1 out-of-memory errors in a row"


def test_gc_follows_native_cadence(tmp_path: Path) -> None:
    freed: list[int] = []
    guard = MemoryGuard(Settings(base_dir=tmp_path, gc_interval=3600), lambda: freed.append(1),
                        lambda reason: None)
    assert guard.due_in() is None  # nothing ran: nothing to collect
    guard.after_job(True, None)
    due = guard.due_in()
    assert due is not None and due > 0 and not freed
    guard.gc_interval = 0
    assert guard.due_in() <= 0  # type: ignore[operator]
    guard.run()
    assert freed == [1] and guard.due_in() is None


def test_low_watermark_drains_queued_work_and_exits_with_recycle_status(tmp_path: Path) -> None:
    log_dir = tmp_path / "tasklog"
    # 1 MB of resident memory: any process is over it after its first job.
    server = Server(tmp_path / "base", max_rss_bytes=1_000_000, task_log_dir=log_dir)
    try:
        server.wait_ready()
        async_call = {"X-Fc-Invocation-Type": "Async"}
        first = server.run(text_to_image(steps=3, seed=51), headers={**async_call, "X-Task-Id": "g-1"})
        second = server.run(image_only(color=0x445566), headers={**async_call, "X-Task-Id": "g-2"})
        assert first.status_code == 202 and second.status_code == 202, (first.text, second.text)
        code = server.proc.wait(180)
    finally:
        server.stop()
    assert code == EXIT_RECYCLE, server.log()
    # Both tasks, the one queued when the guard tripped included, finished and
    # their final events are in the log.
    tasklog = TaskLog(log_dir, "reader")
    for task_id in ("g-1", "g-2"):
        events = tasklog.read(task_id)
        assert events and events[-1][1]["type"] == "serverless_api", task_id
        assert events[-1][1]["data"]["status"] == "success", events[-1]
    assert "over the watermark" in server.log()


def test_kept_models_go_only_under_real_pressure(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """COMFY_EMBED_KEEP_LOADED's models: never released by the upkeep or a job
    under the watermark; released after an OOM, and when the watermark is
    still crossed after gc and trim, before recycling (which then waits for a
    second look)."""
    released: list[str] = []
    trips: list[str] = []
    kept = ["model.safetensors"]
    guard = MemoryGuard(Settings(base_dir=tmp_path, max_rss_bytes=1000, oom_recycle_after=3),
                        lambda: None, trips.append,
                        lambda reason: (released.append(reason), list(kept))[1])
    rss = iter([500, 500])
    monkeypatch.setattr("comfy_embed.observe.memory.rss_bytes", lambda: next(rss))
    guard.after_job(True, None)
    guard.run()
    assert released == [] and trips == []

    guard.after_job(False, OOM)  # the OOM policy: they go
    assert released == ["out of memory"] and trips == []

    rss = iter([2000, 2000, 500])  # over, over after gc and trim, under once released
    guard.after_job(True, None)
    assert released[1:] == ["resident memory 2000 bytes is over the watermark of 1000"]
    assert trips == [] and not guard.tripped.is_set()

    kept.clear()  # nothing left to release: recycled at once
    rss = iter([2000, 2000])
    guard.after_job(True, None)
    assert len(released) == 3 and guard.tripped.is_set() and len(trips) == 1
