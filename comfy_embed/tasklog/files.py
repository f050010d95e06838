"""The task log's files: their names, their encoding, and how one is published.

``<root>/<task_id>/`` holds:

- ``owner.json``: who claimed the task; its mtime is the lease (leases.py);
- segments ``00000001.json``, ``00000007.json``, ...: each is one flush of
  the writer, a JSON array of ``[seq, event]`` pairs, named by the first seq
  of the range it covers (a range may skip seqs: superseded progress is not
  stored). Segments form a chain: each starts right after the previous one's
  last seq;
- ``final``: the terminal event, ``{"seq", "from", "events", "event",
  "blob"}`` (:class:`FinalMarker`); the only file that is fsynced. The
  owner's last flush goes in it rather than in a segment (unless it is over
  64 KiB compressed): ``events`` are the ``[seq, event]`` pairs from seq
  ``from`` up to the terminal one, ``seq``, so a short task writes no
  segment at all. It holds no base64 image data (blobs.py): those bytes are
  in the saved output file or in the sidecar ``final.<token>.blob``. Small
  records of other features written with the final event (``records``, e.g.
  the replay record) ride in it too: no file of their own;
- ``cancel``: a cancel request from any instance;
- ``owner_key``: the hash of the API key that created the task;
- other names (letters first, see :meth:`~.log.TaskLog.put_record`): records
  that other features keep beside the log (webhook deliveries, delivery.py).

``<root>/@index/`` names the tasks still open and the webhooks not yet done,
so that the periodic scans need not list every task folder (index.py).

Segments (still named ``.json``) and ``final`` are JSON compressed with
zlib: the first byte of a zlib stream, ``x``, is never the first byte of
JSON, so the plain JSON files of earlier versions still read.

NFS or an object-storage mount (ossfs) may not append or rename over a name
reliably, so no file is modified in place: each is written under a hidden temp
name (leading ``.``, ignored by readers) and published with ``os.link``, which
fails if the name exists: atomic (no half segments) and exclusive (no shared
seq: only one writer can start a segment at a given seq, and a writer computes
that seq from the chain it sees, so ranges never overlap). Without hard links,
an ``O_EXCL`` hidden lock that records the reserved range reserves the name
and the fresh temp file is renamed to it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_embed.events import FINAL, dumps_bytes, loads

__all__ = ["OWNER", "FINAL_FILE", "CANCEL", "KEY", "LOCK_RE", "NO_LINK", "PLACEHOLDER",
           "FinalMarker", "segment_name", "lock_name", "segment_seqs", "is_log_file", "fsync_dir",
           "sync_file", "listdir", "SpareFile", "publish", "read", "encode", "decode", "parse",
           "load", "event_pairs", "read_final"]

log = logging.getLogger(__name__)

#: The task's lease: who claimed it (leases.py).
OWNER = "owner.json"
#: The terminal event (:class:`FinalMarker`).
FINAL_FILE = "final"
#: A cancel request.
CANCEL = "cancel"
#: The hash of the API key that created the task.
KEY = "owner_key"
_SEQ_RE = re.compile(r"(\d{8,})\.json")
#: A no-hard-link reservation of a segment's name (see :func:`publish`).
LOCK_RE = re.compile(r"\.(\d{8,})\.json\.lock")
# errnos by which a filesystem says "no hard links here" (FUSE mounts, SMB...).
NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
#: zlib level: the default, about as fast as 1 on these small JSON files.
_ZLEVEL = 6
#: A seq slot with no event: the task's terminal event, which lives in ``final``.
PLACEHOLDER = {"type": FINAL}


@dataclass(frozen=True)
class FinalMarker:
    """The ``final`` file, decoded."""

    seq: int
    #: None for logs of earlier versions: the event is then in the segment.
    event: dict[str, Any] | None
    blob: str | None
    #: First seq of the range this file holds (``events`` then the terminal
    #: event); None when a placeholder in a segment reserved it.
    first: int | None = None
    events: tuple[tuple[int, dict[str, Any]], ...] = ()
    #: Records written with the final event (name -> decoded JSON), or None.
    records: dict[str, Any] | None = None


def segment_name(seq: int) -> str:
    """The file name of the segment whose range starts at ``seq``."""
    return f"{seq:08d}.json"


def lock_name(seq: int) -> str:
    """The no-hard-link reservation of :func:`segment_name` ``(seq)``."""
    return f".{seq:08d}.json.lock"


def segment_seqs(names: Iterable[str]) -> list[int]:
    """The first seqs of the segments among ``names``, sorted."""
    return sorted(int(m.group(1)) for n in names if (m := _SEQ_RE.fullmatch(n)))


def is_log_file(name: str) -> bool:
    """Whether ``name`` is one of the log's own files (not another feature's record)."""
    return (name in (OWNER, FINAL_FILE, CANCEL, KEY) or name.startswith(FINAL_FILE + ".")
            or _SEQ_RE.fullmatch(name) is not None)


def fsync_dir(path: Path) -> None:
    """fsync a directory, where the filesystem allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # several network and FUSE filesystems refuse fsync on a directory


def sync_file(path: Path) -> None:
    """fsync a file :func:`publish` wrote without ``durable``, and its
    directory (for the rename fallback; on journaling filesystems the
    file's fsync already committed its name, so that one costs nothing).
    A file deleted meanwhile needs nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def listdir(path: Path) -> set[str]:
    """The names in a folder; none if it does not exist."""
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


class SpareFile:
    """An empty temp file made ahead of a :func:`publish` into its folder
    (a spare task folder holds one: spares.py). Creating a file is the
    costly part of a publish on a busy disk (an inode and a directory
    entry: 0.05-0.4 ms on the benchmark VM, against microseconds to open an
    existing one, write and link it), so the final event's file is made off
    the answer's path. A crash leaves it as a publish's own temp file would
    be left (readers skip dot files)."""

    #: Its name in a spare task folder.
    NAME = ".tmp-final"

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Taken by a publish (which deletes it, whatever happens).
        self.used = False

    @classmethod
    def make(cls, directory: Path) -> "SpareFile":
        """A new one in ``directory``."""
        spare = cls(directory / cls.NAME)
        os.close(os.open(spare.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return spare

    def discard(self) -> None:
        """Deleted, unless a publish took it."""
        if not self.used:
            self.path.unlink(missing_ok=True)


def publish(directory: Path, name: str, payload: bytes, durable: bool = False,
            reservation: bytes = b"", spare: SpareFile | None = None) -> bool:
    """Create ``directory/name`` holding ``payload`` atomically, only if absent.

    ``durable``: on disk when this returns. One fsync does it: the file is
    fsynced after it got its name, which on journaling filesystems (ext4,
    xfs, btrfs) commits the new directory entry with it, and NFS makes a link
    durable on the server before answering. Only the rename fallback also
    syncs the directory. ``reservation`` is written into the no-hard-link
    lock, so that a writer that loses the name can learn which range the
    winner took. ``spare``: a :class:`SpareFile` made in ``directory``
    beforehand, written instead of a new temp file (and deleted either way).
    """
    if spare is not None:
        # Opened, not created, and not truncated (it is empty): on ext4 a
        # close after a truncation starts the file's writeback at once
        # (auto_da_alloc), 0.1 ms on the answer's path. A missing one is
        # created, as without a spare.
        spare.used = True
        try:
            fd = os.open(spare.path, os.O_WRONLY)
        except FileNotFoundError:
            fd = os.open(spare.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        tmp, f = spare.path, open(fd, "wb")
    else:
        tmp = directory / f".tmp-{uuid.uuid4().hex}"
        f = open(tmp, "wb")
    final = directory / name
    try:
        with f:
            f.write(payload)
            f.flush()
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in NO_LINK:
                    raise
                try:
                    fd = os.open(directory / f".{name}.lock",
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                try:
                    if reservation:
                        os.write(fd, reservation)
                finally:
                    os.close(fd)
                if final.exists():
                    return False
                # The reservation is ours, so nobody else renames onto this name.
                os.rename(tmp, final)
                if durable:
                    os.fsync(f.fileno())
                    fsync_dir(directory)
                return True
            if durable:
                os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read(path: Path) -> bytes | None:
    """A file's bytes, or None if it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def encode(value: Any) -> bytes:
    """A segment's or the final's bytes: compact JSON, zlib-compressed."""
    return zlib.compress(dumps_bytes(value), _ZLEVEL)


def decode(raw: bytes) -> Any:
    """:func:`encode` undone; plain JSON (earlier versions) as it is.
    ValueError when it is neither."""
    if raw[:1] == b"x":  # a zlib stream's first byte; JSON never starts so
        try:
            raw = zlib.decompress(raw)
        except zlib.error as e:
            raise ValueError(str(e)) from None
    return loads(raw)


def parse(raw: bytes | None, where: object) -> Any:
    """:func:`decode` of a file's bytes ``raw`` read from ``where``; None
    when there were none, or they do not decode (logged)."""
    if raw is None:
        return None
    try:
        return decode(raw)
    except ValueError:
        # Never a half-written file (publishing is atomic): real corruption.
        log.warning("tasklog: skipping undecodable file %s", where)
        return None


def load(path: Path) -> Any:
    """A file decoded (:func:`parse`), or None."""
    return parse(read(path), path)


def event_pairs(value: Any, first: int) -> list[tuple[int, dict[str, Any]]]:
    """A segment's ``(seq, event)`` pairs; an earlier version's file is one event."""
    if isinstance(value, dict):
        return [(first, value)]
    out: list[tuple[int, dict[str, Any]]] = []
    if isinstance(value, list):
        for item in value:
            if (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                    and isinstance(item[1], dict)):
                out.append((item[0], item[1]))
    return out


def read_final(d: Path) -> FinalMarker | None:
    """The task folder ``d``'s ``final`` file, or None (none yet, or undecodable)."""
    raw = read(d / FINAL_FILE)
    if raw is None:
        return None
    text = raw.strip()
    if text.isdigit():
        return FinalMarker(int(text), None, None)  # an earlier version's marker
    try:
        value = decode(raw)
        first = value.get("from")
        records = value.get("records")
        return FinalMarker(int(value["seq"]), value["event"], value.get("blob"),
                           None if first is None else int(first),
                           tuple(event_pairs(value.get("events") or [], 0)),
                           records if isinstance(records, dict) else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("tasklog: undecodable final marker in %s", d)
        return None
