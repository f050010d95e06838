"""Task folders made ahead: a claim renames one into place instead of making
a folder and its lease file on the request's path.

Creating a file or folder is the costly part of a claim on a busy disk
(an inode and a directory entry: 0.05-0.4 ms each on the benchmark VM,
against microseconds for a rename or a link), and a claim made two. A spare
is a folder in ``<root>/@spare`` holding the lease file and the empty file
the final event will be written into; :meth:`take` renames it to the task's
name with ``RENAME_NOREPLACE``, which, like ``mkdir``, fails when the name
exists: the claim stays exclusive across instances. Spares are made off the
request's path (:meth:`refill`, in a worker thread once an answer has gone;
made during a run, their creations slowed the run's own image write on the
same ext4 journal). Where the
filesystem has no such rename (NFS, some FUSE mounts: EINVAL) or no
``renameat2`` exists, claims make their folder as before.

The ``@`` in ``@spare`` is not allowed in task ids, so no listing of tasks
sees spares. A crash leaves its spares behind: :meth:`sweep` (run with the
recovery scan) deletes the ones older than an hour, of any instance.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SPARE_FOLDER", "SpareFolders", "rename_noreplace"]

log = logging.getLogger(__name__)

#: The folder of spares under the log's root.
SPARE_FOLDER = "@spare"
#: renameat2's flag: fail with EEXIST instead of replacing the target.
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
#: What says "this filesystem (or kernel) has no such rename".
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM})
#: Spares older than this are a dead instance's: :meth:`SpareFolders.sweep` deletes them.
_ABANDONED_SECONDS = 3600.0


def _load_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that never replaces: FileExistsError when ``dst`` exists;
    an OSError with EINVAL/ENOSYS where it cannot be done."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here", dst)
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)  # EEXIST: FileExistsError


class SpareFolders:
    """The spares one instance makes (``tag`` starts their names), at most
    ``keep`` ready at a time. Thread-safe; every method blocks on file I/O."""

    def __init__(self, root: Path, tag: str, keep: int = 2) -> None:
        self.folder = Path(root) / SPARE_FOLDER
        self._tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)[:40]
        self.keep = keep
        self._ready: list[str] = []
        self._lock = threading.Lock()
        #: False once the filesystem refused the rename: claims make folders.
        self.usable = _renameat2 is not None

    @property
    def wanted(self) -> bool:
        """Whether :meth:`refill` would make any."""
        return self.usable and len(self._ready) < self.keep

    def take(self, dest: Path, before: Callable[[Path], None] | None = None) -> bool:
        """Rename a ready spare to ``dest``: True when done; FileExistsError
        when ``dest`` exists (exclusive, as mkdir); False when no spare is
        ready or renames cannot be used here (make the folder instead).
        ``before(spare)`` runs just before the rename (renewing the lease)."""
        with self._lock:
            if not self.usable or not self._ready:
                return False
            spare = self._ready.pop()
        try:
            if before is not None:
                before(Path(spare))
            rename_noreplace(spare, str(dest))
        except FileExistsError:
            with self._lock:
                self._ready.append(spare)
            raise
        except FileNotFoundError:
            # The destination's folder is missing (the caller makes it), or
            # the spare was swept meanwhile (an instance idle for an hour).
            if os.path.isdir(spare):
                with self._lock:
                    self._ready.append(spare)
            return False
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            log.info("tasklog: %s cannot rename without replacing (%s); claims make "
                     "their folders", self.folder.parent, e)
            self.usable = False
            shutil.rmtree(spare, ignore_errors=True)
            return False
        return True

    def refill(self, fill: Callable[[Path], None]) -> None:
        """Make spares until ``keep`` are ready; ``fill(folder)`` writes what
        each must hold (the lease and the final's file)."""
        while self.usable:
            with self._lock:
                if len(self._ready) >= self.keep:
                    return
            path = self.folder / f"{self._tag}-{uuid.uuid4().hex}"
            try:
                path.mkdir()
            except FileNotFoundError:
                self.folder.mkdir(parents=True, exist_ok=True)
                path.mkdir()
            fill(path)
            with self._lock:
                self._ready.append(str(path))

    def drop(self) -> None:
        """Delete this instance's ready spares (it stops claiming)."""
        with self._lock:
            ready, self._ready = self._ready, []
        for spare in ready:
            shutil.rmtree(spare, ignore_errors=True)

    def sweep(self, now: float | None = None) -> None:
        """Delete spares left by instances that died (older than an hour)."""
        cutoff = (time.time() if now is None else now) - _ABANDONED_SECONDS
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return
        with self._lock:
            mine = set(self._ready)
        for entry in entries:
            try:
                if entry.path not in mine and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except FileNotFoundError:
                continue
