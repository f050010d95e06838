"""Leases on a filesystem that several instances share: one file per lease.

A lease file is created exclusively (only one instance can take it) and
names its holder, ``{"instance_id", "claimed_at"}``; its mtime is the last
renewal, so renewing is one ``utime`` and nobody rewrites the file. A lease
not renewed for ``seconds`` has expired; a released one has mtime 0 (the
epoch), so it is expired at once and can be told from one that lapsed.

The task leases (``owner.json``, log.py), the webhook delivery leases
(``webhook.lease.NNNN``, delivery.py) and the model download locks
(``.<name>.lock``, comfy_embed/inputs/models.py) are all such files. A task
lease stays when released (its file says who ran the task); a download lock
is dropped (:meth:`Leases.drop`) and, when its holder died, broken
(:meth:`Leases.break_expired`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from comfy_embed.events import dumps_bytes, loads
from comfy_embed.tasklog.files import NO_LINK, publish, read

__all__ = ["Leases", "RELEASED"]

#: The renewal time of a released lease.
RELEASED = 0.0


class Leases:
    """The leases that instance ``instance_id`` takes, each valid for
    ``seconds`` after its last renewal; ``clock`` gives the wall-clock time
    written into them (tests pass a fake one). Every method blocks on file
    I/O: call them from a worker thread."""

    def __init__(self, instance_id: str, seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.instance_id = instance_id
        self.seconds = seconds
        self.clock = clock
        #: Whether the filesystem took a hard link (:meth:`take_as_link`) so far.
        self._links = True

    @property
    def links(self) -> bool:
        """Whether the filesystem took hard links so far (:meth:`take_as_link`)."""
        return self._links

    def refuse_links(self) -> None:
        """The filesystem refused a hard link elsewhere: take no lease as one."""
        self._links = False

    def _touch(self, path: Path, when: float | None = None) -> None:
        t = self.clock() if when is None else when
        os.utime(path, (t, t))

    def record(self) -> bytes:
        """What a lease this instance takes holds, as of now."""
        return dumps_bytes({"instance_id": self.instance_id, "claimed_at": self.clock()})

    def take_as_link(self, path: Path, source: str) -> bool:
        """Take the lease ``path`` in a folder this caller just made (an
        exclusive mkdir) as a hard link of ``source``, a file it just created
        holding :meth:`record`: one file created instead of two (about
        0.1 ms of kernel time each on a busy VM). False where the filesystem
        has no hard links: then :meth:`take`."""
        if not self._links:
            return False
        try:
            os.link(source, path)
        except OSError as e:
            if e.errno not in NO_LINK:
                raise
            self._links = False
            return False
        if self.clock is not time.time:
            self._touch(path)  # as take() does for a test's clock
        return True

    def take(self, path: Path, *, folder_is_ours: bool = False) -> bool:
        """Create the lease file ``path`` held by this instance, renewed now;
        False if it exists (taken before, by anyone).

        ``folder_is_ours``: the folder was just made by this caller (an
        exclusive mkdir), so a plain exclusive create is enough: cheaper
        than publishing (this is on every request's path); a reader that
        catches the file empty sees no holder yet.
        """
        info = self.record()
        if folder_is_ours:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, info)
            finally:
                os.close(fd)
        elif not publish(path.parent, path.name, info):
            return False
        if self.clock is not time.time:
            # A new file's mtime is the wall clock already (the lease starts
            # now); only another clock (a test's) must be written.
            self._touch(path)
        return True

    def renew(self, path: Path) -> bool:
        """Renew the lease now; False if its file is gone."""
        try:
            self._touch(path)
        except FileNotFoundError:
            return False
        return True

    def release(self, path: Path) -> None:
        """Expire the lease at once (:data:`RELEASED`), so that another
        instance may take over without waiting for it to lapse."""
        try:
            self._touch(path, when=RELEASED)
        except FileNotFoundError:
            pass

    def drop(self, path: Path) -> None:
        """Delete the lease file if this instance holds it (a lock whose work is done)."""
        if self.holder(path) == self.instance_id:
            path.unlink(missing_ok=True)

    def break_expired(self, path: Path) -> str | None:
        """Move an expired lease out of the way so that :meth:`take` can
        succeed again; of several instances breaking it at once, one rename
        wins. The former holder (None if another instance won, or unknown)."""
        aside = path.with_name(f"{path.name}.stale-{self.instance_id}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        try:
            return self.holder(aside) or aside.read_text(errors="replace")
        except OSError:
            return None
        finally:
            aside.unlink(missing_ok=True)

    def renewed_at(self, path: Path) -> float:
        """When the lease was last renewed (:data:`RELEASED` once released);
        FileNotFoundError if there is no such lease."""
        return os.stat(path).st_mtime

    def live(self, path: Path, now: float | None = None) -> bool:
        """Whether the lease exists and has not expired at ``now`` (default: the clock's now)."""
        try:
            renewed = self.renewed_at(path)
        except FileNotFoundError:
            return False
        return (self.clock() if now is None else now) - renewed <= self.seconds

    @staticmethod
    def holder(path: Path) -> str | None:
        """The instance id named in the lease file, or None (no file, or unreadable)."""
        raw = read(path)
        try:
            info = loads(raw) if raw else None
        except ValueError:
            return None
        value = info.get("instance_id") if isinstance(info, dict) else None
        return value if isinstance(value, str) else None
