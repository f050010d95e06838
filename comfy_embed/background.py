"""Work that outlives the request that started it (assembling a result,
writing the task log, sending a webhook), owned by one anyio task group so
that shutdown can wait for it, and cancel what is left.

The server's lifespan opens the group (``async with background.open()``) and
drains it on shutdown; ``Engine.run`` opens one for its own call when none is
open. :meth:`Background.spawn` is synchronous, so a loop callback (the
executor thread's wake-up) can start work too. What that work shares (an
HTTP client of the loop) is closed when the group closes
(:meth:`Background.on_close`).

Outside an open group (a bare ``Engine.submit`` from library code or a test)
work still runs, as a task of the running loop that this object tracks:
``live`` counts it and :meth:`drain` waits for it, but nothing cancels it
when the caller's scope ends; await the task (``Task.wait()``) before the
loop closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import anyio
from anyio.abc import TaskGroup

if sys.version_info < (3, 11):  # anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

try:
    import sniffio
except ImportError:  # anyio then assumes asyncio wherever a loop runs
    sniffio = None  # type: ignore[assignment]

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
        self._live: set[Spawned] = set()
        self._idle: list[anyio.Event] = []
        #: Detached work (no group open), kept referenced until it ends.
        self._detached: set[asyncio.Task[None]] = set()
        #: Awaited each time the open group closes (see :meth:`on_close`).
        self._closers: list[Callable[[], Callable[[], Awaitable[None]] | None]] = []

    def part(self, name: str) -> Background:
        """A view sharing this group that counts its own work."""
        return Background(name, parent=self)

    # ------------------------------------------------------------ the group
    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Background]:
        """Own a task group for the body: work spawned meanwhile runs in it.
        Leaving waits for that work (call :meth:`cancel` first to stop it).

        An exception of the body comes out as itself, not wrapped in an
        exception group: the work in the group never raises (it is logged),
        so a group holds only the body's own exception.
        """
        if self._parent is not None:
            raise RuntimeError("open the root Background, not a part of it")
        if self.attached:
            raise RuntimeError(f"{self.name}: a task group is already open")
        try:
            async with anyio.create_task_group() as tg:
                self._group, self._group_loop = tg, asyncio.get_running_loop()
                try:
                    yield self
                finally:
                    self._group = self._group_loop = None
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):  # also when the lifespan is cancelled
                await self._close_shared()

    def on_close(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Await ``fn()`` each time the open group closes, once its work has
        ended: what the work shared (an HTTP client of that loop) goes with it.

        A part registers with its root. A bound method is held weakly, so
        registering does not keep its object alive.
        """
        ref: Callable[[], Callable[[], Awaitable[None]] | None]
        ref = weakref.WeakMethod(fn) if inspect.ismethod(fn) else (lambda: fn)
        self._root()._closers.append(ref)

    async def _close_shared(self) -> None:
        for ref in list(self._closers):
            fn = ref()
            if fn is None:
                self._closers.remove(ref)
                continue
            try:
                await fn()
            except Exception:
                log.exception("%s: closing %r failed", self.name, fn)

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
        """Cancel the work started here (a root's includes its parts').

        Each piece has its own cancel scope: cancelling the group's scope
        would also cancel the code inside ``async with open()``, the
        server's lifespan that is still shutting down.
        """
        for spawned in list(self._live):
            spawned.cancel()

    # ----------------------------------------------------------------- work
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> Spawned:
        """Start ``fn(*args)`` in the open group (detached if none is open).

        Synchronous, callable from a loop callback. An exception it raises is
        logged, never passed on: one failed writer must not cancel its
        siblings or the server's lifespan.
        """
        with _asyncio_declared():
            spawned = Spawned(name or str(getattr(fn, "__qualname__", repr(fn))))
            self._track(spawned, True)
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
            self._track(spawned, False)

    @property
    def live(self) -> int:
        """Pieces of work started here that have not ended."""
        return len(self._live)

    async def drain(self) -> None:
        """Wait until no work started here is left (work started meanwhile included)."""
        while self._live:
            idle = anyio.Event()
            self._idle.append(idle)
            await idle.wait()

    def _track(self, spawned: Spawned, live: bool) -> None:
        if live:
            self._live.add(spawned)
        else:
            self._live.discard(spawned)
            if not self._live:
                idle, self._idle = self._idle, []
                for ev in idle:
                    ev.set()
        if self._parent is not None:
            self._parent._track(spawned, live)

    def _root(self) -> Background:
        return self if self._parent is None else self._parent._root()


@contextlib.contextmanager
def _asyncio_declared() -> Iterator[None]:
    """Tell anyio the loop is asyncio where it cannot tell by itself.

    anyio asks sniffio, which recognises asyncio by its current task; a loop
    callback (the executor's wake-up under uvicorn) has none, and anyio then
    refuses to make a cancel scope, a task handle (``start_soon``) or even a
    token (``anyio.lowlevel.current_token``: NoEventLoopError). The engine
    runs on asyncio only (its tasks use asyncio primitives), so declaring it
    is true.

    No documented anyio API does this for a callback: ``from_thread.run_sync``
    with a token blocks its caller until the loop ran the function (the
    executor thread must never wait for the loop, and the loop thread would
    wait for itself), and ``BlockingPortal.start_task_soon``, which does not
    block, runs the work in the portal's task group instead of this one.
    anyio's own non-blocking hop into a loop (``AsyncBackend.run_sync_soon``,
    what the portal uses) sets this same sniffio variable, which sniffio
    documents for exactly this declaration.
    """
    if sniffio is None or asyncio.current_task() is not None:
        yield
        return
    token = sniffio.current_async_library_cvar.set("asyncio")
    try:
        yield
    finally:
        sniffio.current_async_library_cvar.reset(token)
