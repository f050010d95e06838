"""Persisted per-task event log on a filesystem that several instances share.

``<root>/<task_id>/`` holds:

- ``owner.json``: who claimed the task; its mtime is the lease;
- segments ``00000001.json``, ``00000007.json``, ...: each is one flush of
  the writer, a JSON array of ``[seq, event]`` pairs, named by the first seq
  of the range it covers (a range may skip seqs: superseded progress is not
  stored). Segments form a chain: each starts right after the previous one's
  last seq;
- ``final``: the terminal event, ``{"seq", "from", "events", "event",
  "blob"}``; the only file that is fsynced. The owner's last flush goes in
  it rather than in a segment (unless it is over 64 KiB compressed):
  ``events`` are the ``[seq, event]`` pairs from seq ``from`` up to the
  terminal one, ``seq``, so a short task writes no segment at all. It holds
  no base64 image data: a ``results[].output.base64`` whose bytes are
  exactly the saved output file, lying in the output folder that holds
  this log (the default layout: instances that share the log share that
  folder), keeps a reference (``file`` relative to the log root, ``size``,
  ``crc32``); any other keeps its bytes in the sidecar
  ``final.<token>.blob`` (raw bytes, not fsynced). Both are put back as
  base64 on read; an output file deleted or changed since (retention
  deletes the output folder just before the log) reads as
  ``base64: {"error": {"type": "output_unavailable", "message"}}``;
- ``cancel``: a cancel request from any instance;
- other names (letters first, see :meth:`TaskLog.put_record`): records that
  other features keep beside the log (webhook deliveries, ...).

``<root>/@index/`` names the tasks still open and the webhooks not yet done,
so that the periodic scans need not list every task folder (logindex.py).

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

Exactly one terminal event, whoever writes it: ``final`` is published
exclusively. Only the owner (the :class:`TaskLog` that claimed the task,
its writes serialised) writes other events; another instance writes only a
terminal event (recovering a lost task), and first publishes a segment
ending with a ``serverless_api`` placeholder, which reserves its seq in the
chain, so that no segment of the owner's at that seq can be read before
that final appears with a lower seq. The owner's ``final`` comes after its
own chain, so readers take its ``events`` in place of any segment from
``from`` on (only placeholders of finishers that lost the race can be
there). Readers stop before a placeholder with no ``final`` yet, and skip
one whose writer lost the race. Durability: the answer to a caller waits for
``final`` (fsynced with its directory); segments and the blob are written
without fsync, so a crash of the process (kill -9) loses nothing, and a
crash of the machine can lose only progress and inlined images, never the
final event. Logs written by earlier versions (one event per file,
``final`` holding only a seq, or its event with the placeholder in a
segment, uncompressed) are still read.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_embed.events import dumps_bytes, final_event, loads
from comfy_embed.taskid import valid_task_id
from comfy_embed.tasklog.index import DoneIndex, NameIndex

__all__ = ["FINAL_TYPE", "TaskLog", "LogUsage", "DeliveryLog"]

log = logging.getLogger(__name__)

FINAL_TYPE = "serverless_api"

_SEQ_RE = re.compile(r"(\d{8,})\.json")
_LOCK_RE = re.compile(r"\.(\d{8,})\.json\.lock")
_RECORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
_OWNER = "owner.json"
_FINAL = "final"
_CANCEL = "cancel"
_RESERVED = frozenset({_OWNER, _FINAL, _CANCEL})
# errnos by which a filesystem says "no hard links here" (FUSE mounts, SMB...).
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
#: A seq slot with no event: the task's terminal event, which lives in ``final``.
_PLACEHOLDER = {"type": FINAL_TYPE}
#: How long a writer waits for a no-hard-link reservation to name its range.
_RESERVATION_WAIT = 2.0
#: The owner's last flush goes into ``final`` up to this size (compressed);
#: a larger one is a segment of its own, so the fsynced file stays small.
_EMBED_LIMIT = 64 * 1024
#: zlib level: the default, about as fast as 1 on these small JSON files.
_ZLEVEL = 6


@dataclass(frozen=True)
class LogUsage:
    """What one task's log holds on disk."""

    files: int
    bytes: int


@dataclass(frozen=True)
class _Final:
    seq: int
    #: None for logs of earlier versions: the event is then in the segment.
    event: dict[str, Any] | None
    blob: str | None
    #: First seq of the range this file holds (``events`` then the terminal
    #: event); None when a placeholder in a segment reserved it.
    first: int | None = None
    events: tuple[tuple[int, dict[str, Any]], ...] = ()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # several network and FUSE filesystems refuse fsync on a directory


def _listdir(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def _seqs(names: Iterable[str]) -> list[int]:
    return sorted(int(m.group(1)) for n in names if (m := _SEQ_RE.fullmatch(n)))


def _seg(seq: int) -> str:
    return f"{seq:08d}.json"


def _lock(seq: int) -> str:
    return f".{seq:08d}.json.lock"


def _publish(directory: Path, name: str, payload: bytes, durable: bool = False,
             reservation: bytes = b"") -> bool:
    """Create ``directory/name`` holding ``payload`` atomically, only if absent.

    ``durable``: on disk when this returns. One fsync does it: the file is
    fsynced after it got its name, which on journaling filesystems (ext4,
    xfs, btrfs) commits the new directory entry with it, and NFS makes a link
    durable on the server before answering. Only the rename fallback also
    syncs the directory. ``reservation`` is written into the no-hard-link
    lock, so that a writer that loses the name can learn which range the
    winner took.
    """
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    final = directory / name
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_LINK:
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
                    _fsync_dir(directory)
                return True
            if durable:
                os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _encode(value: Any) -> bytes:
    """A segment's or the final's bytes: compact JSON, zlib-compressed."""
    return zlib.compress(dumps_bytes(value), _ZLEVEL)


def _decode(raw: bytes) -> Any:
    """:func:`_encode` undone; plain JSON (earlier versions) as it is.
    ValueError when it is neither."""
    if raw[:1] == b"x":  # a zlib stream's first byte; JSON never starts so
        try:
            raw = zlib.decompress(raw)
        except zlib.error as e:
            raise ValueError(str(e)) from None
    return loads(raw)


def _load(path: Path) -> Any:
    raw = _read(path)
    if raw is None:
        return None
    try:
        return _decode(raw)
    except ValueError:
        # Never a half-written file (publishing is atomic): real corruption.
        log.warning("tasklog: skipping undecodable file %s", path)
        return None


def _pairs(value: Any, first: int) -> list[tuple[int, dict[str, Any]]]:
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


@functools.lru_cache(maxsize=64)
def _resolved_dir(path: str) -> str:
    """An output folder, symlinks resolved (a handful per process: cached)."""
    return os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    """Whether the normalised ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _output_file(out: dict[str, Any], raw: bytes, root: str) -> dict[str, Any] | None:
    """A reference to the output file named by ``out["comfy"]`` if it holds
    exactly ``raw`` and lies in the output folder that holds the log
    ``root`` (resolved): every instance reading this log then reads the
    file too. None otherwise (the bytes are then copied). Plain strings,
    not pathlib: this runs on every answer's path."""
    comfy = out.get("comfy")
    if not isinstance(comfy, dict):
        return None
    try:
        base = _resolved_dir(str(comfy["dir"]))
        # normpath, not realpath: a realpath costs an lstat per component;
        # the bytes are compared below anyway.
        path = os.path.normpath(os.path.join(base, comfy["subfolder"], comfy["filename"]))
    except (KeyError, TypeError, ValueError, OSError, RuntimeError):
        return None
    if (not _inside(root, base) or root == base or not _inside(path, base)
            or _inside(path, root)):
        return None
    try:
        with open(path, "rb") as f:
            on_disk = f.read(len(raw) + 1)
    except OSError:
        return None
    if on_disk != raw:
        return None  # converted, or written over since: keep a copy
    return {"file": os.path.relpath(path, root).replace(os.sep, "/"), "size": len(raw),
            "crc32": zlib.crc32(raw)}


def _split_blobs(event: dict[str, Any], root: str) -> tuple[dict[str, Any], bytes]:
    """The final event without its base64 image data, and the data that must
    be copied as raw bytes; each ``base64`` output then says where its bytes
    are: in the output file (``file``, see :func:`_output_file`) or in the
    copy (``blob``: offset and length)."""
    data = event.get("data")
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        return event, b""
    chunks: list[bytes] = []
    offset = 0
    new_results: list[Any] = []
    changed = False
    for r in results:
        out = r.get("output") if isinstance(r, dict) else None
        b64 = out.get("base64") if isinstance(out, dict) else None
        text = b64.get("data") if isinstance(b64, dict) else None
        if not isinstance(out, dict) or not isinstance(b64, dict) or not isinstance(text, str):
            new_results.append(r)
            continue
        try:
            raw = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            new_results.append(r)  # not canonical base64: keep it inline
            continue
        ref = {k: v for k, v in b64.items() if k != "data"}
        pointer = _output_file(out, raw, root)
        if pointer is not None:
            ref.update(pointer)
        else:
            chunks.append(raw)
            ref["blob"] = [offset, len(raw)]
            offset += len(raw)
        changed = True
        new_results.append({**r, "output": {**out, "base64": ref}})
    if not changed:
        return event, b""
    return {**event, "data": {**data, "results": new_results}}, b"".join(chunks)


def _relative_file(value: Any) -> str | None:
    """A ``file`` reference as written by :func:`_output_file`: ``..``
    steps out of the log root, then a path down; None for anything else."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\\" in value:
        return None
    parts = value.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    rest = parts[ups:]
    if not ups or not rest or any(p in ("", ".", "..") for p in rest):
        return None
    return value


def _unavailable(out: dict[str, Any], why: str) -> dict[str, Any]:
    """What a reader gets in place of base64 data whose output file is gone."""
    comfy = out.get("comfy")
    name = comfy.get("filename") if isinstance(comfy, dict) else None
    return {"error": {"type": "output_unavailable",
                      "message": f"the output file {name!r} {why} after the task ended: "
                                 f"its base64 data is no longer available"}}


def _inline_blobs(event: dict[str, Any], blob: bytes | None, root: Path,
                  where: str) -> dict[str, Any]:
    """Put the image bytes back as base64 ``data``: from the sidecar, or
    from the output file (relative to this reader's log ``root``)."""
    data = event.get("data")
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        return event
    new_results: list[Any] = []
    for r in results:
        out = r.get("output") if isinstance(r, dict) else None
        b64 = out.get("base64") if isinstance(out, dict) else None
        if not isinstance(out, dict) or not isinstance(b64, dict) or not (
                "blob" in b64 or "file" in b64):
            new_results.append(r)
            continue
        if "file" in b64:
            rest = {k: v for k, v in b64.items() if k not in ("file", "size", "crc32")}
            rel = _relative_file(b64["file"])
            try:
                raw = (root / rel).read_bytes() if rel is not None else None
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raw = None
            except OSError as e:
                log.warning("tasklog: cannot read the output file of %s: %s", where, e)
                raw = None
            if raw is None:
                rest = _unavailable(out, "was deleted")
            elif len(raw) != b64.get("size") or zlib.crc32(raw) != b64.get("crc32"):
                rest = _unavailable(out, "was changed")
            else:
                rest = {"data": base64.b64encode(raw).decode("ascii"), **rest}
            new_results.append({**r, "output": {**out, "base64": rest}})
            continue
        ref = b64.get("blob")
        if not isinstance(ref, list) or len(ref) != 2:
            new_results.append(r)
            continue
        start, length = ref
        rest = {k: v for k, v in b64.items() if k != "blob"}
        if blob is not None and 0 <= start and start + length <= len(blob):
            rest = {"data": base64.b64encode(blob[start:start + length]).decode("ascii"), **rest}
            new_results.append({**r, "output": {**out, "base64": rest}})
        else:
            # Only a crash of the machine (the blob is not fsynced) gets here.
            log.warning("tasklog: image data of %s is missing", where)
            new_results.append({**r, "output": {k: v for k, v in out.items() if k != "base64"}})
    return {**event, "data": {**data, "results": new_results}}


class TaskLog:
    """The event logs of all tasks under ``root``, shared by several instances.

    ``instance_id`` names this instance in the leases it takes. An owner must
    call :meth:`renew` more often than every ``lease_seconds`` for the tasks it
    runs; a task whose lease expired without a final event is closed by
    :meth:`recover_orphans` on any instance. Only the object that claimed a
    task writes its other events (until :meth:`release`); others write only
    a terminal event to it (the module doc says why). ``clock`` gives the
    wall-clock time written into leases (tests pass a fake one). All methods block on
    file I/O: call them from a worker thread. Invalid task ids raise
    ``ValueError``; callers check :meth:`valid_task_id` first.
    """

    def __init__(self, root: Path, instance_id: str, lease_seconds: float = 30.0, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.instance_id = instance_id
        self.lease_seconds = lease_seconds
        self._clock = clock
        # Last seq of the chain as this instance last wrote it, per task: saves
        # listing the directory on every write. A stale value only costs one
        # failed link (only the writer of a segment can extend the chain past it).
        self._end: dict[str, int] = {}
        self._lock = threading.Lock()
        #: The tasks claimed and not final: what recover_orphans looks at.
        self.open_index = NameIndex(self.root, "open")
        #: The finished tasks by when they finished: what retention looks at.
        self.done_index = DoneIndex(self.root)
        #: Tasks this object claimed and has not released: it alone writes
        #: their non-terminal events, its writes to each one at a time.
        self._owned: dict[str, threading.Lock] = {}
        self._resolved_root: str | None = None

    #: Whether ``task_id`` is safe as a directory name (the one rule, taskid.py).
    valid_task_id = staticmethod(valid_task_id)

    def _dir(self, task_id: str) -> Path:
        if not self.valid_task_id(task_id):
            raise ValueError(f"invalid task id {task_id!r}")
        return self.root / task_id

    def task_dir(self, task_id: str) -> Path:
        """The folder of a task (it may not exist yet)."""
        return self._dir(task_id)

    def _touch(self, path: Path, when: float | None = None) -> None:
        t = self._clock() if when is None else when
        os.utime(path, (t, t))

    # ------------------------------------------------------------- claiming
    def claim(self, task_id: str) -> bool:
        """Create the task with this instance as owner; False if it already exists."""
        d = self._dir(task_id)
        try:
            d.mkdir()
        except FileNotFoundError:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                d.mkdir()
            except FileExistsError:
                return False
        except FileExistsError:
            return False
        self.open_index.add(task_id)  # before anyone can rely on it (owner.json)
        with self._lock:
            # The folder is new, so the chain is empty: the first write needs
            # no listing to learn where it starts (see _next_seq).
            self._end[task_id] = 0
            self._owned[task_id] = threading.Lock()
        owner = {"instance_id": self.instance_id, "claimed_at": self._clock()}
        # The directory is ours alone (mkdir is exclusive): a plain exclusive
        # create is enough. A reader that catches it empty sees no owner yet.
        fd = os.open(d / _OWNER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, dumps_bytes(owner))
        finally:
            os.close(fd)
        if self._clock is not time.time:
            # A new file's mtime is the wall clock already (the lease starts
            # now); only another clock (a test's) must be written.
            self._touch(d / _OWNER)
        return True

    def discard(self, task_id: str) -> None:
        """Undo this instance's :meth:`claim` of a task that was never
        accepted (queue full, draining), so a retry can claim it again."""
        d = self._dir(task_id)
        names = _listdir(d)
        if self.owner(task_id) != self.instance_id or _seqs(names) or _FINAL in names:
            return
        shutil.rmtree(d, ignore_errors=True)
        self.open_index.drop(task_id)
        with self._lock:
            self._end.pop(task_id, None)
            self._owned.pop(task_id, None)

    # -------------------------------------------------------------- writing
    def append(self, task_id: str, event: dict[str, Any]) -> int:
        """Persist ``event`` (``{"type", "data"}``) as the task's next event; return its seq.

        A terminal event (type ``FINAL_TYPE``) is on disk (fsynced) before
        this returns. Once the task has a terminal event nothing more is
        accepted: the existing final's seq is returned instead.
        """
        return self._write(task_id, [(None, event)])[0]

    def extend(self, task_id: str, events: Sequence[tuple[int | None, dict[str, Any]]]) -> int:
        """Persist a batch of ``(seq, event)`` in one file (one flush).

        The seqs are the caller's (the in-memory task numbers its events, and
        readers of any instance must see the same numbers); they must
        increase and may skip numbers. Pairs whose seq another writer took
        meanwhile are dropped. A terminal event may only come last: it is
        fsynced as :meth:`append` does. Returns the seq of the last event
        that counts, or of the final event already there.
        """
        return self._write(task_id, list(events))[0]

    @contextmanager
    def _writing(self, task_id: str) -> Iterator[bool]:
        """One write at a time to a task this object owns; yields whether it does."""
        with self._lock:
            lock = self._owned.get(task_id)
        if lock is None:
            yield False
            return
        with lock:
            yield True

    def _write(self, task_id: str, pairs: list[tuple[int | None, dict[str, Any]]]) -> tuple[int, bool]:
        """Write pairs (seq None: the next one); the flag is False when the
        terminal event among them did not count (or nothing was written)."""
        d = self._dir(task_id)
        if not pairs:
            return (final.seq if (final := self._final(d)) else 0), False
        if any(ev.get("type") == FINAL_TYPE for _, ev in pairs[:-1]):
            raise ValueError("a terminal event can only come last")
        is_final = pairs[-1][1].get("type") == FINAL_TYPE
        with self._writing(task_id) as owned:
            if not (owned and is_final):
                final = self._final(d)
                if final is not None:
                    return final.seq, False
                d.mkdir(parents=True, exist_ok=True)
                return self._write_chain(d, task_id, pairs, is_final)
            # The owner's last flush goes into the final file (no placeholder:
            # the owner is the only writer of other events, see the module
            # doc). No look for a final first: publishing one is exclusive,
            # and a final already there (a recovery that took this instance
            # for dead) makes it lose as a look would (see _finish).
            first = self._next_seq(d, task_id)
            items = self._number(task_id, first, pairs[:-1])
            seq = pairs[-1][0]
            nxt = items[-1][0] + 1 if items else first
            seq = nxt if seq is None or seq < nxt else seq
            try:
                return self._finish(d, task_id, seq, pairs[-1][1], first, items)
            except FileNotFoundError:
                if d.is_dir():
                    raise
                # Its folder was deleted under it: the final event still lands.
                d.mkdir(parents=True, exist_ok=True)
                return self._finish(d, task_id, seq, pairs[-1][1], first, items)

    def _number(self, task_id: str, first: int, pairs: Sequence[tuple[int | None, dict[str, Any]]]
                ) -> list[tuple[int, dict[str, Any]]]:
        """Seqs for pairs written from ``first`` on: a pair without one gets
        the next; a terminal event the next free; other pairs whose seq was
        taken by another writer are dropped."""
        items: list[tuple[int, dict[str, Any]]] = []
        nxt = first
        for seq, ev in pairs:
            terminal = ev.get("type") == FINAL_TYPE
            if seq is None or (seq < nxt and terminal):
                seq = nxt
            elif seq < nxt:
                log.warning("tasklog: task %s: seq %d was taken by another writer; "
                            "event dropped", task_id, seq)
                continue
            items.append((seq, _PLACEHOLDER if terminal else ev))
            nxt = seq + 1
        return items

    def _write_chain(self, d: Path, task_id: str, pairs: list[tuple[int | None, dict[str, Any]]],
                     is_final: bool) -> tuple[int, bool]:
        """Publish pairs as the next segment of the chain (a terminal event as
        its placeholder, then ``final`` naming it)."""
        while True:
            first = self._next_seq(d, task_id)
            items = self._number(task_id, first, pairs)
            if not items:
                return first - 1, False
            end = items[-1][0]
            if _publish(d, _seg(first), _encode(items), reservation=str(end).encode()):
                break
            with self._lock:
                self._end.pop(task_id, None)  # another writer extended the chain
            if (final := self._final(d)) is not None:
                return final.seq, False
        with self._lock:
            self._end[task_id] = end
        if not is_final:
            final = self._final(d)
            # Landed after a final (raced it): readers stop at the final, never see it.
            if final is not None and (final.seq < end or (final.first is not None
                                                          and first >= final.first)):
                return final.seq, False
            return end, True
        return self._finish(d, task_id, end, pairs[-1][1])

    def _root(self) -> str:
        if self._resolved_root is None:
            self._resolved_root = os.path.realpath(self.root)
        return self._resolved_root

    def _finish(self, d: Path, task_id: str, seq: int, event: dict[str, Any],
                first: int | None = None, events: Sequence[tuple[int, dict[str, Any]]] = ()
                ) -> tuple[int, bool]:
        """Publish ``final``: ``event`` at ``seq``, with ``events`` from
        ``first`` on (the owner), or named by a placeholder (``first`` None)."""
        stripped, blob = _split_blobs(event, self._root())
        blob_name = None
        if blob:
            blob_name = f"{_FINAL}.{uuid.uuid4().hex}.blob"
            _publish(d, blob_name, blob)
        marker: dict[str, Any] = {"seq": seq, "event": stripped, "blob": blob_name}
        if first is not None:
            marker.update({"from": first, "events": list(events)})
        payload = _encode(marker)
        if events and len(payload) > _EMBED_LIMIT:
            # Too much to fsync cheaply: the events get a segment of their own.
            end, ok = self._write_chain(d, task_id, list(events), False)
            if not ok:  # a final came meanwhile
                if blob_name:
                    (d / blob_name).unlink(missing_ok=True)
                return end, False
            seq = max(seq, end + 1)
            marker.update({"seq": seq, "from": end + 1, "events": []})
            payload = _encode(marker)
        if _publish(d, _FINAL, payload, durable=True):
            with self._lock:
                self._end[task_id] = seq
            self._closed(task_id)
            return seq, True
        # Lost the race: ours stays hidden. Without hard links the winner
        # reserves the marker before renaming it in, so give it a moment.
        if blob_name:
            (d / blob_name).unlink(missing_ok=True)
        deadline = time.monotonic() + 5.0
        while (final := self._final(d)) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if final is None:
            log.error("tasklog: task %s: final marker reserved but never written", task_id)
        return (final.seq if final else seq), False

    def _closed(self, task_id: str) -> None:
        """The task has its final event: from the open index to the done index."""
        try:
            self.done_index.add(task_id, self._clock(), moving_from=self.open_index)
        except OSError as e:  # the next recovery scan moves it
            log.warning("tasklog: task %s: cannot move its index entry: %s", task_id, e)

    def _next_seq(self, d: Path, task_id: str) -> int:
        """The first seq after the chain: after this instance's last write, or
        after what the directory shows."""
        with self._lock:
            end = self._end.get(task_id)
        if end is not None:
            return end + 1
        names = _listdir(d)
        end = 0
        segs = _seqs(names)
        if segs:
            last = segs[-1]
            pairs = _pairs(_load(d / _seg(last)), last)
            end = pairs[-1][0] if pairs else last
        # A no-hard-link reservation past the last segment: its writer is
        # publishing (or died); its range is taken either way.
        for m in map(_LOCK_RE.fullmatch, names):
            if m and int(m.group(1)) > end:
                end = max(end, self._reserved_end(d, int(m.group(1))))
        return end + 1

    def _reserved_end(self, d: Path, first: int) -> int:
        deadline = time.monotonic() + _RESERVATION_WAIT
        while True:
            raw = _read(d / _lock(first))
            if raw and raw.strip().isdigit():
                return int(raw)
            if raw is None or time.monotonic() > deadline:
                return first  # written by an earlier version, or its writer died
            time.sleep(0.002)

    # -------------------------------------------------------------- reading
    def _final(self, d: Path) -> _Final | None:
        raw = _read(d / _FINAL)
        if raw is None:
            return None
        text = raw.strip()
        if text.isdigit():
            return _Final(int(text), None, None)  # an earlier version's marker
        try:
            value = _decode(raw)
            first = value.get("from")
            return _Final(int(value["seq"]), value["event"], value.get("blob"),
                          None if first is None else int(first),
                          tuple(_pairs(value.get("events") or [], 0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("tasklog: undecodable final marker in %s", d)
            return None

    def _final_event(self, d: Path, final: _Final) -> dict[str, Any] | None:
        if final.event is None:
            return None
        blob = _read(d / final.blob) if final.blob else None
        return _inline_blobs(final.event, blob, self.root, str(d))

    def _pending(self, d: Path, lo: int, hi: int, names: set[str]) -> bool:
        """Whether a live writer still holds a reservation for a seq in [lo, hi)."""
        for m in map(_LOCK_RE.fullmatch, names):
            if m and lo <= int(m.group(1)) < hi and _seg(int(m.group(1))) not in names:
                try:
                    age = time.time() - os.stat(d / m.group(0)).st_mtime
                except FileNotFoundError:
                    continue
                if age < self.lease_seconds:  # else its writer died: skip the hole
                    return True
        return False

    def read(self, task_id: str, since: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """Events with seq > ``since`` as ``(seq, event)``, in order, up to the final one.

        An unknown task gives ``[]``. Safe while other instances write: an
        event once returned never gets an earlier-seq event inserted before
        it. Only the segments after ``since`` are read.
        """
        d = self._dir(task_id)
        final = self._final(d)  # before listing: its segment is then listed
        names = _listdir(d)
        segs = _seqs(names)
        out: list[tuple[int, dict[str, Any]]] = []
        expected = since + 1
        # The owner's final holds the events from ``first`` on itself: a
        # segment there is a placeholder of a finisher that lost the race.
        end = 0 if final is None else final.seq if final.first is None else final.first - 1
        for i, first in enumerate(segs):
            nxt = segs[i + 1] if i + 1 < len(segs) else None
            if nxt is not None and nxt <= since + 1:
                continue  # the whole segment is at or before ``since``
            if final is not None and first > end:
                break
            # Only the no-hard-link fallback can leave a hole while a writer is
            # mid-publish; stop there so a poller using ``since`` misses nothing.
            if first > expected and self._pending(d, expected, first, names):
                return out
            pairs = _pairs(_load(d / _seg(first)), first)
            for seq, event in pairs:
                if seq <= since:
                    continue
                if final is not None and seq > end:
                    if final.first is None:
                        return out
                    break
                if event.get("type") == FINAL_TYPE:
                    if final is None:
                        return out  # its marker comes next, unless it loses a race
                    if seq != final.seq:
                        continue  # lost the race for the marker
                    full = self._final_event(d, final) if final.event is not None else event
                    if full is not None:
                        out.append((seq, full))
                    return out
                out.append((seq, event))
            if pairs:
                expected = max(expected, pairs[-1][0] + 1)
        if final is not None and final.first is not None:
            if final.seq > since and not self._pending(d, expected, final.first, names):
                out.extend((seq, event) for seq, event in final.events if seq > since)
                full = self._final_event(d, final)
                if full is not None:
                    out.append((final.seq, full))
            return out
        if final is not None and final.event is not None and final.seq > since:
            # The segment holding its placeholder was lost (a machine crash):
            # the final event itself is durable.
            if not self._pending(d, expected, final.seq, names):
                full = self._final_event(d, final)
                if full is not None:
                    out.append((final.seq, full))
        return out

    def is_final(self, task_id: str) -> bool:
        """Whether the task has its terminal event."""
        return (self._dir(task_id) / _FINAL).exists()

    def exists(self, task_id: str) -> bool:
        """Whether the task was claimed (or written to) by any instance."""
        return self._dir(task_id).is_dir()

    def usage(self, task_id: str) -> LogUsage:
        """Files and bytes the task's log holds (all instances' writes)."""
        files = size = 0
        try:
            with os.scandir(self._dir(task_id)) as it:
                for entry in it:
                    try:
                        size += entry.stat().st_size
                    except FileNotFoundError:
                        continue
                    files += 1
        except FileNotFoundError:
            pass
        return LogUsage(files, size)

    # -------------------------------------------------------------- records
    def put_record(self, task_id: str, name: str, payload: bytes, *, durable: bool = False) -> bool:
        """Store a file of another feature (webhook deliveries, ...) in the
        task's folder, atomically and only if ``name`` is absent (so a record
        name can serve as an exclusive claim across instances).

        ``name``: a letter, then up to 127 of [A-Za-z0-9._-]; the log's own
        names are refused. ``durable`` fsyncs it. Returns False if it exists.
        """
        if (not _RECORD_RE.fullmatch(name) or name in _RESERVED
                or name.startswith(_FINAL + ".")):
            raise ValueError(f"invalid or reserved record name {name!r}")
        d = self._dir(task_id)
        d.mkdir(parents=True, exist_ok=True)
        return _publish(d, name, payload, durable=durable)

    def get_record(self, task_id: str, name: str) -> bytes | None:
        """A record's bytes, or None."""
        if not _RECORD_RE.fullmatch(name):
            raise ValueError(f"invalid record name {name!r}")
        return _read(self._dir(task_id) / name)

    def records(self, task_id: str, prefix: str = "") -> list[str]:
        """Names of the task's records starting with ``prefix``, sorted."""
        return sorted(n for n in _listdir(self._dir(task_id))
                      if n.startswith(prefix) and _RECORD_RE.fullmatch(n)
                      and n not in _RESERVED and not n.startswith(_FINAL + ".")
                      and not _SEQ_RE.fullmatch(n))

    # ----------------------------------------------------- leases, cancel
    def renew(self, task_ids: Iterable[str]) -> None:
        """Refresh the leases of the tasks this instance runs."""
        for task_id in task_ids:
            try:
                self._touch(self._dir(task_id) / _OWNER)
            except FileNotFoundError:
                pass  # recovered and cleaned up elsewhere, or never claimed
            except OSError as exc:
                log.warning("tasklog: cannot renew lease of task %s: %s", task_id, exc)

    def owns(self, task_id: str) -> bool:
        """Whether this object claimed the task and has not released it."""
        with self._lock:
            return task_id in self._owned

    def release(self, task_id: str, *, final: bool = False) -> None:
        """Give up ownership (normally after the final event).

        The lease is expired at once, so a task released without a final event
        is closed by the next :meth:`recover_orphans` instead of hanging.
        ``final``: the caller saw the task's final event land (its own or
        another's); nothing looks at the lease any more, so it is left alone
        (a write saved on every answer's path).
        """
        with self._lock:
            self._end.pop(task_id, None)
            self._owned.pop(task_id, None)
        if final:
            return
        try:
            self._touch(self._dir(task_id) / _OWNER, when=0.0)
        except FileNotFoundError:
            pass

    def request_cancel(self, task_id: str) -> bool:
        """Ask whichever instance runs the task to cancel it; False if unknown or final."""
        d = self._dir(task_id)
        if not d.is_dir() or self.is_final(task_id):
            return False
        _publish(d, _CANCEL, dumps_bytes({"instance_id": self.instance_id}))
        return True

    def cancel_requested(self, task_id: str) -> bool:
        """Whether any instance asked to cancel the task."""
        return (self._dir(task_id) / _CANCEL).exists()

    def owner(self, task_id: str) -> str | None:
        """The instance id that claimed the task, or None."""
        raw = _read(self._dir(task_id) / _OWNER)
        try:
            info = loads(raw) if raw else None
        except ValueError:
            return None
        value = info.get("instance_id") if isinstance(info, dict) else None
        return value if isinstance(value, str) else None

    def _renewed_at(self, d: Path) -> float:
        try:
            return os.stat(d / _OWNER).st_mtime
        except FileNotFoundError:
            # Appended without a claim, or died between mkdir and the owner
            # file: the last change to the directory is the best evidence.
            return os.stat(d).st_mtime

    def recover_orphans(self, now: float | None = None) -> list[str]:
        """Close every unfinished task whose lease expired with a ``task_lost`` error.

        Returns the ids this call closed. When several instances recover at
        once each task still gets exactly one final event, and only the
        instance whose event counted lists it.
        """
        now = self._clock() if now is None else now
        lost: list[str] = []
        index = self.open_index
        full = not index.complete()
        # The open index names the tasks to look at; a log from before it
        # (no marker yet) gets one scan of every folder, which indexes them.
        candidates = (sorted(n for n in _listdir(self.root) if self.valid_task_id(n))
                      if full else index.names())
        for task_id in candidates:
            if not self.valid_task_id(task_id):
                continue
            d = self.root / task_id
            if not d.is_dir():
                if not full:
                    index.drop(task_id)  # discarded or pruned
                continue
            if self.is_final(task_id):
                if not full:
                    self._closed(task_id)  # a crash between its final and the move
                continue
            if full:
                index.add(task_id)
            try:
                renewed = self._renewed_at(d)
            except FileNotFoundError:
                continue  # claimed a moment ago: owner.json comes next
            idle = now - renewed
            if idle <= self.lease_seconds:
                continue
            owner = self.owner(task_id) or "unknown"
            if renewed == 0.0:  # see release(): given up, not expired
                message = (f"the instance running this task ({owner}) released it "
                           f"without a final event")
            else:
                message = (f"the instance running this task stopped (lease expired): "
                           f"{owner} did not renew it for {idle:.0f}s "
                           f"(lease {self.lease_seconds:g}s)")
            event = final_event(task_id, None, {}, error={
                "type": "task_lost", "message": message, "node_errors": {}})
            with self._lock:
                self._end.pop(task_id, None)  # the owner may have written since
            _, won = self._write(task_id, [(None, event)])
            with self._lock:
                self._end.pop(task_id, None)
            if won:
                log.warning("tasklog: task %s lost: %s", task_id, message)
                lost.append(task_id)
        if full:
            index.mark_complete()
        return lost

    # --- safety (issue 9): the API key that owns a task ---------------------
    def set_key_hash(self, task_id: str, key_hash: str) -> None:
        """Record (once) the hash of the API key that created the task. The
        key itself is never written; only a one-way hash of it."""
        _publish(self._dir(task_id), _KEY, key_hash.encode("ascii"), durable=True)

    def key_hash(self, task_id: str) -> str | None:
        """The recorded key hash of the task, or None (unknown task, or
        created with authentication off)."""
        try:
            return (self._dir(task_id) / _KEY).read_text("ascii").strip() or None
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None


# ------------------------------------------------------------------ webhooks
# A task's webhook delivery lives in its own files of the task folder, beside
# (never inside) the event files, and is written with the same exclusive,
# atomic publishing: ``webhook.json`` (the request: URL, events, id),
# ``webhook.lease.NNNN`` (who delivers; mtime is the lease, a higher number
# supersedes), ``webhook.try.NNNN.json`` (attempt N is being sent: exclusive,
# so attempt N goes out once), ``webhook.result.NNNN.json`` (its outcome and
# next try) and ``webhook.done`` (delivered, or given up).
_WEBHOOK = "webhook.json"
_WEBHOOK_DONE = "webhook.done"
_WEBHOOK_LEASE = re.compile(r"webhook\.lease\.(\d{4,})")
_WEBHOOK_TRY = re.compile(r"webhook\.try\.(\d{4,})\.json")
_WEBHOOK_RESULT = re.compile(r"webhook\.result\.(\d{4,})\.json")


class DeliveryLog:
    """Webhook delivery state of the tasks in a :class:`TaskLog`, shared by instances.

    Leases work as the task leases do (``lease_seconds``, the log's clock),
    but a lease is taken over by publishing the next generation, so of two
    instances that both find an expired lease only one wins. Every method
    blocks on file I/O: call them from a worker thread.
    """

    def __init__(self, tasklog: TaskLog) -> None:
        self.tasklog = tasklog
        #: The tasks with a webhook not yet done: what :meth:`pending` looks at.
        self.index = NameIndex(tasklog.root, "webhooks")

    @property
    def lease_seconds(self) -> float:
        return self.tasklog.lease_seconds

    def _dir(self, task_id: str) -> Path:
        return self.tasklog._dir(task_id)

    def register(self, task_id: str, request: dict[str, Any]) -> bool:
        """Record the task's webhook request; False if it already has one."""
        d = self._dir(task_id)
        d.mkdir(parents=True, exist_ok=True)
        self.index.add(task_id)  # first: a crash after the request must leave it findable
        return _publish(d, _WEBHOOK, json.dumps(request).encode(), durable=True)

    def request(self, task_id: str) -> dict[str, Any] | None:
        """The recorded request, or None (no webhook, or no such task)."""
        return _load(self._dir(task_id) / _WEBHOOK)

    def _generations(self, names: Iterable[str]) -> list[int]:
        return sorted(int(m.group(1)) for n in names if (m := _WEBHOOK_LEASE.fullmatch(n)))

    def claim(self, task_id: str) -> int | None:
        """Take the delivery lease: the new generation, or None while another
        instance (or this one, elsewhere) holds an unexpired lease."""
        d = self._dir(task_id)
        gens = self._generations(_listdir(d))
        if gens:
            try:
                idle = self.tasklog._clock() - os.stat(d / f"webhook.lease.{gens[-1]:04d}").st_mtime
            except FileNotFoundError:
                idle = float("inf")
            if idle <= self.lease_seconds:
                return None
        gen = (gens[-1] if gens else 0) + 1
        info = {"instance_id": self.tasklog.instance_id, "claimed_at": self.tasklog._clock()}
        if not _publish(d, f"webhook.lease.{gen:04d}", json.dumps(info).encode()):
            return None  # another instance took this generation first
        self.tasklog._touch(d / f"webhook.lease.{gen:04d}")
        return gen

    def holds(self, task_id: str, gen: int) -> bool:
        """Whether generation ``gen`` is still the newest lease (nobody took over)."""
        return max(self._generations(_listdir(self._dir(task_id))), default=0) == gen

    def renew(self, task_id: str, gen: int) -> bool:
        """Refresh our lease; False once another instance took over."""
        if not self.holds(task_id, gen):
            return False
        try:
            self.tasklog._touch(self._dir(task_id) / f"webhook.lease.{gen:04d}")
        except FileNotFoundError:
            return False
        return True

    def release(self, task_id: str, gen: int) -> None:
        """Expire our lease at once, so another instance may resume without waiting."""
        if self.holds(task_id, gen):
            try:
                self.tasklog._touch(self._dir(task_id) / f"webhook.lease.{gen:04d}", when=0.0)
            except FileNotFoundError:
                pass

    def begin_attempt(self, task_id: str, attempt: int, record: dict[str, Any]) -> bool:
        """Reserve attempt number ``attempt`` before sending it; False if it
        was already reserved (by a stale owner, or a rival): then do not send."""
        return _publish(self._dir(task_id), f"webhook.try.{attempt:04d}.json",
                        json.dumps(record).encode(), durable=True)

    def end_attempt(self, task_id: str, attempt: int, record: dict[str, Any]) -> None:
        """Record how attempt ``attempt`` ended (status, error, next try)."""
        _publish(self._dir(task_id), f"webhook.result.{attempt:04d}.json",
                 json.dumps(record).encode(), durable=True)

    def finish(self, task_id: str, record: dict[str, Any]) -> bool:
        """Mark the delivery done (delivered, failed or not wanted); once only."""
        first = _publish(self._dir(task_id), _WEBHOOK_DONE, json.dumps(record).encode(),
                         durable=True)
        try:
            self.index.drop(task_id)
        except OSError as e:  # the next pending() drops it
            log.warning("webhook of task %s: cannot drop its index entry: %s", task_id, e)
        return first

    def state(self, task_id: str) -> dict[str, Any] | None:
        """Everything recorded about the task's delivery, or None without a webhook:
        ``request``, ``attempts`` (each the begin record merged with its
        result, in order), ``done`` (or None) and ``lease`` (the newest one:
        ``instance_id``, ``renewed_at``; or None)."""
        d = self._dir(task_id)
        request = _load(d / _WEBHOOK)
        if request is None:
            return None
        names = _listdir(d)
        tries = sorted(int(m.group(1)) for n in names if (m := _WEBHOOK_TRY.fullmatch(n)))
        results = {int(m.group(1)) for n in names if (m := _WEBHOOK_RESULT.fullmatch(n))}
        attempts: list[dict[str, Any]] = []
        for n in tries:
            record = dict(_load(d / f"webhook.try.{n:04d}.json") or {})
            record["attempt"] = n
            if n in results:
                record.update(_load(d / f"webhook.result.{n:04d}.json") or {})
            attempts.append(record)
        lease = None
        gens = self._generations(names)
        if gens:
            path = d / f"webhook.lease.{gens[-1]:04d}"
            info = _load(path) or {}
            try:
                lease = {"instance_id": info.get("instance_id"), "generation": gens[-1],
                         "renewed_at": os.stat(path).st_mtime}
            except FileNotFoundError:
                pass
        return {"request": request, "attempts": attempts, "done": _load(d / _WEBHOOK_DONE),
                "lease": lease}

    def undelivered(self, task_id: str) -> bool:
        """Whether the task has a webhook not yet delivered or given up."""
        d = self._dir(task_id)
        return (d / _WEBHOOK).exists() and not (d / _WEBHOOK_DONE).exists()

    def pending(self) -> list[str]:
        """Tasks with a final event and a webhook not yet done whose lease is
        free or expired: deliveries some instance should (re)start. Looks at
        the tasks in the webhook index (logindex.py); a log from before it
        gets one scan of every folder, which indexes them."""
        out: list[str] = []
        now = self.tasklog._clock()
        index, root = self.index, self.tasklog.root
        full = not index.complete()
        candidates = sorted(_listdir(root)) if full else index.names()
        for task_id in candidates:
            d = root / task_id
            if not self.tasklog.valid_task_id(task_id):
                continue
            if not (d / _WEBHOOK).exists():
                # Registered before its task can end: with a final event and
                # no request, the registration failed (or the folder is gone).
                if not full and (not d.is_dir() or self.tasklog.is_final(task_id)):
                    index.drop(task_id)
                continue
            if (d / _WEBHOOK_DONE).exists():
                if not full:
                    index.drop(task_id)  # a crash between done and the drop
                continue
            if full:
                index.add(task_id)
            if not self.tasklog.is_final(task_id):
                continue
            gens = self._generations(_listdir(d))
            if gens:
                try:
                    if now - os.stat(d / f"webhook.lease.{gens[-1]:04d}").st_mtime <= self.lease_seconds:
                        continue
                except FileNotFoundError:
                    pass
            out.append(task_id)
        if full:
            index.mark_complete()
        return out


_KEY = "owner_key"
