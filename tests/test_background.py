"""Background work: owned by one task group, counted, drained, cancelled."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging

import anyio
import pytest

from comfy_embed.background import Background

pytestmark = pytest.mark.anyio


async def test_spawned_work_runs_in_the_open_group_and_drains() -> None:
    bg = Background()
    writers = bg.part("writers")
    release = anyio.Event()
    ran: list[str] = []

    async def work(name: str) -> None:
        await release.wait()
        ran.append(name)

    with anyio.fail_after(5):
        async with bg.open():
            assert bg.attached
            bg.spawn(work, "a")
            writers.spawn(work, "b")
            # Synchronous spawn from a loop callback (the executor's wake-up),
            # in a context of its own, as call_soon_threadsafe from a thread
            # under uvicorn gives it (no sign of which async library runs).
            asyncio.get_running_loop().call_soon(bg.spawn, work, "c", context=contextvars.Context())
            await anyio.sleep(0)
            assert (bg.live, writers.live) == (3, 1)
            release.set()
            await writers.drain()
            assert "b" in ran
            await bg.drain()
            assert bg.live == 0 and sorted(ran) == ["a", "b", "c"]
        assert not bg.attached


async def test_leaving_the_group_waits_for_its_work() -> None:
    bg = Background()
    ended: list[bool] = []

    async def slow() -> None:
        await anyio.sleep(0.05)
        ended.append(True)

    with anyio.fail_after(5):
        async with bg.open():
            bg.spawn(slow)
        assert ended == [True] and bg.live == 0


async def test_a_failure_is_logged_and_spares_its_siblings(caplog: pytest.LogCaptureFixture) -> None:
    bg = Background()
    sibling = anyio.Event()

    async def boom() -> None:
        raise RuntimeError("writer broke")

    async def fine() -> None:
        await anyio.sleep(0.05)
        sibling.set()

    with anyio.fail_after(5), caplog.at_level(logging.ERROR):
        async with bg.open():
            bg.spawn(boom, name="boom")
            bg.spawn(fine)
        assert sibling.is_set()
    assert "boom failed" in caplog.text and "writer broke" in caplog.text


async def test_cancel_one_piece_or_the_whole_group() -> None:
    bg = Background()
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(name)
            raise

    with anyio.fail_after(5):
        async with bg.open():
            one = bg.spawn(forever, "one")
            bg.spawn(forever, "two")
            await anyio.sleep(0)
            one.cancel()
            await one.wait()
            assert one.done and cancelled == ["one"] and bg.live == 1
            part = bg.part("part")
            part.spawn(forever, "three")
            await anyio.sleep(0)
            part.cancel()  # a part cancels only its own work
            await part.drain()
            assert cancelled == ["one", "three"] and bg.live == 1
            bg.cancel()
            # The body of the group is not cancelled: shutdown goes on here.
            await bg.drain()
            assert cancelled == ["one", "three", "two"] and bg.live == 0
        assert bg.live == 0


async def test_without_an_open_group_work_is_tracked_on_the_loop() -> None:
    bg = Background()
    done = anyio.Event()

    async def work() -> None:
        await anyio.sleep(0.01)
        done.set()

    with anyio.fail_after(5):
        assert not bg.attached
        spawned = bg.spawn(work)
        assert bg.live == 1
        await bg.drain()
        assert done.is_set() and spawned.done and bg.live == 0


async def test_only_the_root_opens_and_only_once() -> None:
    bg = Background()
    with pytest.raises(RuntimeError, match="root"):
        async with bg.part("x").open():
            pass
    async with bg.open():
        with pytest.raises(RuntimeError, match="already open"):
            async with bg.open():
                pass


async def test_an_error_of_the_body_comes_out_as_itself() -> None:
    """Engine.run and the CLI raise the task's typed error through the group."""
    bg = Background()
    with pytest.raises(KeyError, match="the body's"):
        async with bg.open():
            raise KeyError("the body's")
    assert not bg.attached


async def test_what_the_work_shares_closes_with_the_group() -> None:
    """Closers run each time the group closes, after its work ended; a bound
    method's object is not kept alive by registering it."""
    bg = Background()
    events: list[str] = []
    release = anyio.Event()

    class Client:
        async def aclose(self) -> None:
            events.append("client closed")

    async def plain() -> None:
        events.append("plain closed")

    async def work() -> None:
        await release.wait()
        events.append("work ended")

    client = Client()
    bg.part("webhooks").on_close(client.aclose)  # a part registers with its root
    bg.on_close(plain)
    with anyio.fail_after(5):
        async with bg.open():
            bg.spawn(work)
            release.set()
        assert events == ["work ended", "client closed", "plain closed"]
        del client
        gc.collect()
        async with bg.open():
            pass
        assert events[3:] == ["plain closed"]
