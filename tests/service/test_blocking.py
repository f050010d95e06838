"""Where the task log's small blocking calls run (comfy_embed.service.blocking): on
the event loop while the disk answers quickly, in a worker thread otherwise.
The service-level tests use the fake ComfyUI of tests/fakes/comfy_backend.py
(thread mechanics) with the real task log on disk."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from comfy_embed.config import Settings
from comfy_embed.runtime import Engine
from comfy_embed.service.blocking import BlockingCalls
from comfy_embed.service.lifecycle import TaskService
from comfy_embed.tasklog.log import TaskLog

from tests.fakes.comfy_backend import fake_graph
from tests.service.test_lifecycle import SlowValidation, fake_engine  # noqa: F401 (fixture)


def test_calls_go_inline_after_a_streak_of_quick_ones_and_back_after_a_slow_one() -> None:
    calls = BlockingCalls(0.002, streak=3)
    assert not calls.inline  # nothing measured yet: a thread
    for _ in range(2):
        calls.observe(0.0005)
    assert not calls.inline
    calls.observe(0.0005)
    assert calls.inline
    calls.observe(0.002)  # as slow as the limit: too slow
    assert not calls.inline
    for _ in range(3):
        calls.observe(0.001)
    assert calls.inline


def test_a_zero_limit_keeps_every_call_in_a_thread() -> None:
    calls = BlockingCalls(0.0, streak=1)
    for _ in range(5):
        calls.observe(0.0)
    assert not calls.inline


@pytest.mark.anyio
async def test_run_times_calls_in_both_places_and_keeps_their_errors() -> None:
    calls = BlockingCalls(0.05, streak=2)
    loop_thread = threading.get_ident()
    where = [await calls.run(threading.get_ident) for _ in range(3)]
    assert where[0] != loop_thread and where[1] != loop_thread  # measured in threads
    assert where[2] == loop_thread  # then on the loop
    with pytest.raises(ZeroDivisionError):
        await calls.run(lambda: 1 / 0)  # quick, though it failed: still inline
    assert calls.inline
    await calls.run(time.sleep, 0.06)  # slow on the loop: the next goes to a thread
    assert await calls.run(threading.get_ident) != loop_thread


class WhereLog(TaskLog):
    """A real task log that notes which thread claims and writes, and can be
    made slow."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "here")
        self.threads: list[tuple[str, int]] = []
        self.delay = 0.0

    def claim(self, task_id: str) -> bool:
        self.threads.append(("claim", threading.get_ident()))
        return super().claim(task_id)

    def extend(self, task_id: str, events: Any, records: Any = None, **kw: Any) -> int:
        self.threads.append(("write", threading.get_ident()))
        time.sleep(self.delay)
        return super().extend(task_id, events, records, **kw)


def _service(eng: Engine, tmp_path: Path, limit: float) -> tuple[TaskService, WhereLog]:
    """A service over a noting task log, with this inline limit."""
    tasklog = WhereLog(tmp_path / "log")
    settings = eng.settings.replace(task_log_inline_seconds=limit)
    return TaskService(eng, settings, tasklog), tasklog


async def _run_one(service: TaskService, task_id: str) -> dict[str, Any]:
    handle = await service.start(fake_graph("FakeImage"), task_id=task_id)
    return await handle.final()


@pytest.mark.anyio
async def test_the_service_claims_and_writes_on_the_loop_while_the_disk_is_quick(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path) -> None:
    # A generous limit: a loaded test machine's fsync may take a few ms.
    service, tasklog = _service(fake_engine[0], tmp_path, 0.05)
    loop_thread = threading.get_ident()
    # 3 calls per task (claim, final write, then its index entry moved after
    # the answer): 8 quick ones take 3 tasks (their claims and writes noted).
    with anyio.fail_after(20):
        for i in range(6):
            assert (await _run_one(service, f"quick-{i}"))["data"]["status"] == "success"
        first, last = tasklog.threads[:6], tasklog.threads[-4:]
        assert all(thread != loop_thread for _, thread in first)
        assert [what for what, _ in last] == ["claim", "write"] * 2
        assert all(thread == loop_thread for _, thread in last)
        # A write slower than the limit: the calls after it go to threads.
        tasklog.delay = 0.06
        await _run_one(service, "slow-1")
        tasklog.delay = 0.0
        await _run_one(service, "after-slow")
    assert tasklog.threads[-4][1] == loop_thread  # slow-1's claim, still on the loop
    assert tasklog.threads[-3][1] == loop_thread  # its slow write, on the loop once
    assert all(thread != loop_thread for _, thread in tasklog.threads[-2:])
    for task_id in ["quick-5", "slow-1", "after-slow"]:  # each ended in the log
        assert tasklog.read(task_id, 0)[-1][1]["data"]["status"] == "success"
    service.close()


@pytest.mark.anyio
async def test_a_zero_inline_limit_keeps_the_task_log_in_threads(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path) -> None:
    service, tasklog = _service(fake_engine[0], tmp_path, 0)
    with anyio.fail_after(20):
        for i in range(10):
            await _run_one(service, f"threaded-{i}")
    assert len(tasklog.threads) == 20
    assert threading.get_ident() not in {thread for _, thread in tasklog.threads}
    service.close()


def test_the_inline_limit_is_bounded() -> None:
    with pytest.raises(ValueError, match="COMFY_EMBED_TASK_LOG_INLINE_SECONDS"):
        Settings(task_log_inline_seconds=0.5)
