"""Work that outlives the request that started it (assembling a result,
writing the task log, sending a webhook), owned by one anyio task group so
that shutdown can wait for it, and cancel what is left.

The server's lifespan opens the group (``async with background.open()``) and
drains it on shutdown; ``Engine.run`` opens one for its own call when none is
open. :meth:`Background.spawn` is synchronous, so a loop callback (the
executor thread's wake-up) can start work too.

Outside an open group (a bare ``Engine.submit`` from library code or a test)
work still runs, as a task of the running loop that this object tracks:
``live`` counts it and :meth:`drain` waits for it, but nothing cancels it
when the caller's scope ends; await the task (``Task.wait()``) before the
loop closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

log = logging.getLogger(__name__)

__all__ = ["Background", "Spawned"]


class Spawned:
    """One piece of background work: cancel it, or wait for its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._scope = anyio.CancelScope()
        self._ended = anyio.Event()

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    def cancel(self) -> None:
        """Cancel it (at its next await); no effect once it ended."""
        self._scope.cancel()

    async def wait(self) -> None:
        """Until it ended (returned, failed or was cancelled)."""
        await self._ended.wait()


class Background:
    """Background work in one task group, counted so it can be drained.

    A :meth:`part` shares its parent's group but counts (and drains) only
    the work started through it: the service drains its log writers before
    it stops its webhooks, and both belong to the engine's group.
    """

    def __init__(self, name: str = "background", parent: Background | None = None) -> None:
        self.name = name
        self._parent = parent
        self._group: TaskGroup | None = None
        self._group_loop: asyncio.AbstractEventLoop | None = None
        self._live = 0
        self._idle: list[anyio.Event] = []
        #: Detached work (no group open), kept referenced until it ends.
        self._detached: set[asyncio.Task[None]] = set()

    def part(self, name: str) -> Background:
        """A view sharing this group that counts its own work."""
        return Background(name, parent=self)

    # ------------------------------------------------------------ the group
    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Background]:
        """Own a task group for the body: work spawned meanwhile runs in it.
        Leaving waits for that work (call :meth:`cancel` first to stop it)."""
        if self._parent is not None:
            raise RuntimeError("open the root Background, not a part of it")
        if self.attached:
            raise RuntimeError(f"{self.name}: a task group is already open")
        async with anyio.create_task_group() as tg:
            self._group, self._group_loop = tg, asyncio.get_running_loop()
            try:
                yield self
            finally:
                self._group = self._group_loop = None

    @property
    def attached(self) -> bool:
        """Whether a group is open in the running loop."""
        root = self._root()
        if root._group is None:
            return False
        try:
            return root._group_loop is asyncio.get_running_loop()
        except RuntimeError:
            return False

    def cancel(self) -> None:
        """Cancel every piece of work in the open group (shutdown's last step)."""
        root = self._root()
        if root._group is not None:
            root._group.cancel_scope.cancel()

    # ----------------------------------------------------------------- work
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> Spawned:
        """Start ``fn(*args)`` in the open group (detached if none is open).

        Synchronous, callable from a loop callback. An exception it raises is
        logged, never passed on: one failed writer must not cancel its
        siblings or the server's lifespan.
        """
        spawned = Spawned(name or getattr(fn, "__qualname__", repr(fn)))
        self._count(+1)
        root = self._root()
        if self.attached:
            assert root._group is not None
            root._group.start_soon(self._run, spawned, fn, args, name=spawned.name)
        else:
            t = asyncio.get_running_loop().create_task(self._run(spawned, fn, args),
                                                       name=spawned.name)
            root._detached.add(t)
            t.add_done_callback(root._detached.discard)
        return spawned

    async def _run(self, spawned: Spawned, fn: Callable[..., Awaitable[Any]],
                   args: tuple[Any, ...]) -> None:
        try:
            with spawned._scope:
                await fn(*args)
        except Exception:
            log.exception("%s: %s failed", self.name, spawned.name)
        finally:
            spawned._ended.set()
            self._count(-1)

    @property
    def live(self) -> int:
        """Pieces of work started here that have not ended."""
        return self._live

    async def drain(self) -> None:
        """Wait until no work started here is left (work started meanwhile included)."""
        while self._live:
            idle = anyio.Event()
            self._idle.append(idle)
            await idle.wait()

    def _count(self, delta: int) -> None:
        self._live += delta
        if not self._live:
            idle, self._idle = self._idle, []
            for ev in idle:
                ev.set()
        if self._parent is not None:
            self._parent._count(delta)

    def _root(self) -> Background:
        return self if self._parent is None else self._parent._root()
