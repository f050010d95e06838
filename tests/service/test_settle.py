"""The finals' fsyncs after their answers (comfy_embed.service.settle): the
finals written within one span share one round in a worker thread, each
is fsynced and its index entry moved, and a shutdown mid-span still
settles what was written. Real task log on disk."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest

from comfy_embed.background import Background
from comfy_embed.events import FINAL
from comfy_embed.service.settle import Settler
from comfy_embed.tasklog.log import TaskLog


def _final() -> dict[str, object]:
    return {"type": FINAL, "data": {"status": "success", "results": []}}


def _written(tl: TaskLog, *task_ids: str) -> None:
    for task_id in task_ids:
        tl.claim(task_id)
        tl.extend(task_id, [(1, _final())], settle_later=True)


def _done(tl: TaskLog) -> list[str]:
    return sorted(n for _, names in tl.done_index.older_than(float("inf")) for n in names)


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(path fsynced, thread id) for every fsync of a task's final file."""
    calls: list[tuple[str, int]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith("/final"):
            calls.append((path, threading.get_ident()))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_finals_of_one_span_share_one_round_off_the_loop(
        tmp_path: Path, synced: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    tl = TaskLog(tmp_path, "i1")
    _written(tl, "a", "b", "c")
    assert synced == [] and tl.open_index.names() == ["a", "b", "c"]
    rounds: list[list[str]] = []
    real_settle = Settler._settle

    def settle(self: Settler, task_ids: list[str]) -> None:
        rounds.append(list(task_ids))
        real_settle(self, task_ids)
    monkeypatch.setattr(Settler, "_settle", settle)

    async def main() -> None:
        bg = Background()
        async with bg.open():
            settler = Settler(tl, bg, seconds=0.05)
            for task_id in ("a", "b", "c"):
                settler.add(task_id)
            assert synced == []  # nothing before the span ends
            await bg.drain()
            _written(tl, "d")
            settler.add("d")  # a later final starts a round of its own
            await bg.drain()
    loop_thread = threading.get_ident()
    anyio.run(main)
    assert rounds == [["a", "b", "c"], ["d"]]
    assert sorted(Path(p).parent.name for p, _ in synced) == ["a", "b", "c", "d"]
    assert all(thread != loop_thread for _, thread in synced)
    assert tl.open_index.names() == [] and _done(tl) == ["a", "b", "c", "d"]


def test_a_shutdown_mid_span_still_settles_what_was_written(
        tmp_path: Path, synced: list[tuple[str, int]]) -> None:
    tl = TaskLog(tmp_path, "i1")
    _written(tl, "a")

    async def main() -> None:
        bg = Background()
        async with bg.open():
            settler = Settler(tl, bg, seconds=30)
            settler.add("a")
            await anyio.sleep(0.05)
            bg.cancel()  # the lifespan ends long before the span would
            with anyio.fail_after(10):
                await bg.drain()
    anyio.run(main)
    assert [Path(p).parent.name for p, _ in synced] == ["a"]
    assert _done(tl) == ["a"]


def test_a_failed_fsync_is_logged_and_the_round_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    tl = TaskLog(tmp_path, "i1")
    _written(tl, "bad", "good")
    real = tl.settle_final

    def settle_final(task_id: str) -> None:
        if task_id == "bad":
            raise OSError(5, "Input/output error")
        real(task_id)
    monkeypatch.setattr(tl, "settle_final", settle_final)

    async def main() -> None:
        bg = Background()
        async with bg.open():
            settler = Settler(tl, bg, seconds=0)
            settler.add("bad")
            settler.add("good")
            await bg.drain()
    anyio.run(main)
    assert "task bad: cannot fsync its final event" in caplog.text
    assert _done(tl) == ["good"]
    assert TaskLog(tmp_path, "reader").read("bad")[-1][1]["type"] == FINAL  # written all the same
