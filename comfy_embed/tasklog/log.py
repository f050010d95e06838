"""Persisted per-task event log on a filesystem that several instances share.

:class:`TaskLog` is the one entry point: it claims tasks (a lease each,
leases.py), writes their events (writer.py), reads them back (reader.py),
keeps cancel requests, key hashes and other features' records beside them,
and closes the tasks whose owner died. The files and how they are published
are in files.py; base64 image data kept out of the final file, in blobs.py.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_embed.events import FINAL, dumps_bytes, final_event
from comfy_embed.taskid import valid_task_id
from comfy_embed.tasklog.attempts import adopt, archive, attempt_of, restore, summaries
from comfy_embed.tasklog.files import (
    CANCEL,
    FINAL_FILE,
    KEY,
    NO_LINK,
    OWNER,
    SpareFile,
    is_log_file,
    listdir,
    publish,
    read,
    read_final,
    segment_seqs,
    sync_file,
)
from comfy_embed.tasklog.index import DoneIndex, NameIndex
from comfy_embed.tasklog.leases import RELEASED, Leases
from comfy_embed.tasklog.reader import read_events
from comfy_embed.tasklog.spares import SpareFolders
from comfy_embed.tasklog.writer import Pair, Records, Writer

__all__ = ["TaskLog", "LogUsage"]

log = logging.getLogger(__name__)

_RECORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class LogUsage:
    """What one task's log holds on disk."""

    files: int
    bytes: int


class TaskLog:
    """The event logs of all tasks under ``root``, shared by several instances.

    ``instance_id`` names this instance in the leases it takes. An owner must
    call :meth:`renew` more often than every ``lease_seconds`` for the tasks it
    runs; a task whose lease expired without a final event is closed by
    :meth:`recover_orphans` on any instance. Only the object that claimed a
    task writes its other events (until :meth:`release`); others write only
    a terminal event to it (writer.py says why). ``clock`` gives the
    wall-clock time written into leases (tests pass a fake one). All methods block on
    file I/O: call them from a worker thread. Invalid task ids raise
    ``ValueError``; callers check :meth:`valid_task_id` first.
    """

    def __init__(self, root: Path, instance_id: str, lease_seconds: float = 30.0, *,
                 clock: Callable[[], float] = time.time,
                 output_root: Path | None = None) -> None:
        self.root = Path(root)
        #: This instance's leases: the tasks' here, and other features' (delivery.py).
        self.leases = Leases(instance_id, lease_seconds, clock)
        self._writer = Writer(self.root, self._closed, output_root)
        #: The tasks claimed and not final: what recover_orphans looks at.
        self.open_index = NameIndex(self.root, "open")
        #: The finished tasks by when they finished: what retention looks at.
        self.done_index = DoneIndex(self.root)
        #: The attempt number of each task this object claimed again (after a
        #: lost attempt), until released; absent: attempt 1.
        self.attempts: dict[str, int] = {}
        #: Tasks this object claimed and has not released: it alone writes
        #: their non-terminal events, its writes to each one at a time.
        self._owned: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        #: Tasks being written with ``settle_later`` (:meth:`extend`), and
        #: those whose final counted: its fsync and their index entry wait
        #: for :meth:`settle_final`.
        self._settle_later: set[str] = set()
        self._unsettled: set[str] = set()
        #: The final's file of a task this object claimed with a spare folder.
        self._spare_files: dict[str, SpareFile] = {}
        #: The folders of the next claims, made ahead (:meth:`prepare_claims`).
        self._spares = SpareFolders(self.root, instance_id)

    @property
    def instance_id(self) -> str:
        """The instance named in the leases this log takes."""
        return self.leases.instance_id

    @property
    def lease_seconds(self) -> float:
        """How long a lease lasts without renewal."""
        return self.leases.seconds

    #: Whether ``task_id`` is safe as a directory name (the one rule, taskid.py).
    valid_task_id = staticmethod(valid_task_id)

    def _dir(self, task_id: str) -> Path:
        if not self.valid_task_id(task_id):
            raise ValueError(f"invalid task id {task_id!r}")
        return self.root / task_id

    def task_dir(self, task_id: str) -> Path:
        """The folder of a task (it may not exist yet)."""
        return self._dir(task_id)

    def task_ids(self) -> list[str]:
        """Every name under the root that is a task id, sorted: a full scan,
        for logs written before the indexes (index.py)."""
        return sorted(n for n in listdir(self.root) if self.valid_task_id(n))

    # ------------------------------------------------------------- claiming
    def claim(self, task_id: str) -> bool:
        """Create the task with this instance as owner; False if it already exists."""
        d = self._dir(task_id)
        try:
            if self.leases.links and self._spares.take(d, before=self._renew_spare):
                return self._claimed_spare(task_id, d)
        except FileExistsError:
            return False
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
        # The index entry first, before anyone can rely on the lease (owner.json).
        entry = self.open_index.add_new(task_id, self.leases.record())
        # The directory is ours alone (mkdir is exclusive). The lease is the
        # index entry's file, linked (it holds the lease's record): one file
        # created per claim, not two; a new file where links are refused.
        if entry is None or not self.leases.take_as_link(d / OWNER, entry):
            self.leases.take(d / OWNER, folder_is_ours=True)
        return self._own(task_id)

    def _claimed_spare(self, task_id: str, d: Path) -> bool:
        """The rest of a claim whose folder was a spare (spares.py), renamed
        into place with its lease in it: the index entry, a link of the lease."""
        # An entry from before is kept: the recovery scan reads the lease either way.
        try:
            self.open_index.add_link(task_id, d / OWNER)
        except OSError as e:
            if e.errno not in NO_LINK:
                raise
            self.leases.refuse_links()  # from now on claims make folders and files
            self.open_index.add_new(task_id, self.leases.record())
        return self._own(task_id, SpareFile(d / SpareFile.NAME))

    def _own(self, task_id: str, final_file: SpareFile | None = None) -> bool:
        """A claimed task is this object's to write (``final_file``: the
        file its final event goes into); its attempt is looked up. True."""
        self._writer.started(task_id)
        with self._lock:
            self._owned[task_id] = threading.Lock()
            if final_file is not None:
                self._spare_files[task_id] = final_file
        attempt = adopt(self.root, task_id)  # one stat with no earlier attempt
        if attempt > 1:
            self.attempts[task_id] = attempt
        return True

    def _renew_spare(self, spare: Path) -> None:
        # Renewed before the rename: nobody sees the lease with an old mtime.
        self.leases.renew(spare / OWNER)

    def _fill_spare(self, spare: Path) -> None:
        self.leases.take(spare / OWNER, folder_is_ours=True)
        SpareFile.make(spare)  # the final's file

    @property
    def wants_spares(self) -> bool:
        """Whether :meth:`prepare_claims` would make any (a look, no I/O)."""
        return self.leases.links and self._spares.wanted

    def prepare_claims(self) -> None:
        """Make the folders of the next claims ahead (spares.py: each with
        its lease and its final's file), off the requests' paths; nothing
        where the filesystem has no hard links or no exclusive rename."""
        if self.leases.links:
            self._spares.refill(self._fill_spare)

    def close(self) -> None:
        """Delete this object's spare folders (the instance stops claiming)."""
        self._spares.drop()

    def retry(self, task_id: str, max_attempts: int) -> bool:
        """Claim a task again whose last attempt was lost (attempts.py): True
        when this call claimed it for attempt n+1 (at most ``max_attempts``);
        False when it is not to be run again or another retry took it."""
        return archive(self.root, task_id, max_attempts) and self.claim(task_id)

    def attempt(self, task_id: str) -> int:
        """The number of the task's latest attempt (1 for a task never retried)."""
        n = self.attempts.get(task_id)
        return n if n is not None else attempt_of(self._dir(task_id))

    def earlier_attempts(self, task_id: str) -> list[dict[str, Any]]:
        """The task's earlier (lost) attempts, oldest first (attempts.summaries)."""
        return summaries(self._dir(task_id))

    def discard(self, task_id: str) -> None:
        """Undo this instance's :meth:`claim` of a task that was never
        accepted (queue full, draining), so a retry can claim it again."""
        d = self._dir(task_id)
        names = listdir(d)
        if self.owner(task_id) != self.instance_id or segment_seqs(names) or FINAL_FILE in names:
            return
        self._writer.forget(task_id)
        if self.attempts.pop(task_id, 1) > 1:
            self._disown(task_id)
            restore(self.root, task_id)  # the lost attempt stays the answer
            return
        self._disown(task_id)
        shutil.rmtree(d, ignore_errors=True)
        self.open_index.drop(task_id)

    def _disown(self, task_id: str) -> None:
        """This object no longer writes the task: its lock and spare go."""
        with self._lock:
            self._owned.pop(task_id, None)
            spare = self._spare_files.pop(task_id, None)
        if spare is not None:
            spare.discard()

    # -------------------------------------------------------------- writing
    def append(self, task_id: str, event: dict[str, Any]) -> int:
        """Persist ``event`` (``{"type", "data"}``) as the task's next event; return its seq.

        A terminal event (type :data:`comfy_embed.events.FINAL`) is on disk
        (fsynced) before this returns. Once the task has a terminal event
        nothing more is accepted: the existing final's seq is returned instead.
        """
        return self._write(task_id, [(None, event)])[0]

    def extend(self, task_id: str, events: Sequence[Pair], records: Records | None = None,
               *, settle_later: bool = False) -> int:
        """Persist a batch of ``(seq, event)`` in one file (one flush).

        The seqs are the caller's (the in-memory task numbers its events, and
        readers of any instance must see the same numbers); they must
        increase and may skip numbers. Pairs whose seq another writer took
        meanwhile are dropped. A terminal event may only come last: it is
        fsynced as :meth:`append` does. Returns the seq of the last event
        that counts, or of the final event already there. ``records``
        (name -> JSON bytes, small) are written into the final file with
        a terminal event (:meth:`final_record` reads them), and dropped
        when the batch has none or its final did not count.
        ``settle_later`` (the owner's last write, which an answer waits for):
        the final file is written, not yet fsynced, when this returns, and
        its fsync and the index entry's move (open, then done) wait for
        :meth:`settle_final`, after the answer. Written means every process
        and every instance sharing the folder reads it, and a killed process
        loses nothing; only a crash of the machine between the two loses the
        final event (as it loses the output files, which nobody fsyncs), and
        the recovery scan then closes the task as lost.
        """
        if not settle_later:
            return self._write(task_id, list(events), records)[0]
        with self._lock:
            self._settle_later.add(task_id)
        try:
            return self._write(task_id, list(events), records, durable=False)[0]
        finally:
            with self._lock:
                self._settle_later.discard(task_id)

    def settle_final(self, task_id: str) -> None:
        """fsync the final file that :meth:`extend` wrote with
        ``settle_later``, then move its index entry (nothing for any other
        task). Raises OSError when the fsync fails."""
        with self._lock:
            if task_id not in self._unsettled:
                return
            self._unsettled.discard(task_id)
        sync_file(self._dir(task_id) / FINAL_FILE)
        self._closed(task_id)

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

    def _write(self, task_id: str, pairs: list[Pair], records: Records | None = None,
               durable: bool = True) -> tuple[int, bool]:
        """Write pairs (seq None: the next one); the flag is False when the
        terminal event among them did not count (or nothing was written).
        ``durable``: the owner's final file is fsynced before this returns."""
        d = self._dir(task_id)
        if not pairs:
            return (final.seq if (final := read_final(d)) else 0), False
        if any(ev.get("type") == FINAL for _, ev in pairs[:-1]):
            raise ValueError("a terminal event can only come last")
        is_final = pairs[-1][1].get("type") == FINAL
        with self._writing(task_id) as owned:
            if owned and is_final:
                with self._lock:
                    spare = self._spare_files.pop(task_id, None)
                try:
                    return self._writer.owner_final(d, task_id, pairs, records,
                                                    durable=durable, spare=spare)
                finally:
                    if spare is not None:
                        spare.discard()  # when the final did not take it
            final = read_final(d)
            if final is not None:
                return final.seq, False
            d.mkdir(parents=True, exist_ok=True)
            return self._writer.chain(d, task_id, pairs, is_final, records if is_final else None)

    def _closed(self, task_id: str) -> None:
        """The task has its final event: from the open index to the done index."""
        with self._lock:
            if task_id in self._settle_later:
                self._unsettled.add(task_id)  # moved at settle_final()
                return
        try:
            self.done_index.add(task_id, self.leases.clock(), moving_from=self.open_index)
        except OSError as e:  # the next recovery scan moves it
            log.warning("tasklog: task %s: cannot move its index entry: %s", task_id, e)

    # -------------------------------------------------------------- reading
    def read(self, task_id: str, since: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """Events with seq > ``since`` as ``(seq, event)``, in order, up to the final one.

        An unknown task gives ``[]``. Safe while other instances write: an
        event once returned never gets an earlier-seq event inserted before
        it. Only the segments after ``since`` are read.
        """
        return read_events(self._dir(task_id), since, self.root, self.lease_seconds)

    def is_final(self, task_id: str) -> bool:
        """Whether the task has its terminal event."""
        return (self._dir(task_id) / FINAL_FILE).exists()

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
    @staticmethod
    def _record_name(name: str) -> str:
        if not _RECORD_RE.fullmatch(name) or is_log_file(name):
            raise ValueError(f"invalid or reserved record name {name!r}")
        return name

    def put_record(self, task_id: str, name: str, payload: bytes, *, durable: bool = False) -> bool:
        """Store a file of another feature (webhook deliveries, ...) in the
        task's folder, atomically and only if ``name`` is absent (so a record
        name can serve as an exclusive claim across instances).

        ``name``: a letter, then up to 127 of [A-Za-z0-9._-]; the log's own
        names are refused (ValueError). ``durable`` fsyncs it. Returns False
        if it exists; FileNotFoundError if the task's folder does not (a
        record never brings back a task that was deleted).
        """
        return publish(self._dir(task_id), self._record_name(name), payload, durable=durable)

    def final_record(self, task_id: str, name: str) -> Any:
        """A record written into the final file with the terminal event
        (:meth:`extend`), decoded; None if there is none."""
        final = read_final(self._dir(task_id))
        return None if final is None or final.records is None else final.records.get(name)

    def get_record(self, task_id: str, name: str) -> bytes | None:
        """A record's bytes, or None."""
        return read(self._dir(task_id) / self._record_name(name))

    def has_record(self, task_id: str, name: str) -> bool:
        """Whether the record exists (without reading it)."""
        return (self._dir(task_id) / self._record_name(name)).exists()

    def records(self, task_id: str, prefix: str = "") -> list[str]:
        """Names of the task's records starting with ``prefix``, sorted."""
        return sorted(n for n in listdir(self._dir(task_id))
                      if n.startswith(prefix) and _RECORD_RE.fullmatch(n) and not is_log_file(n))

    # ----------------------------------------------------- leases, cancel
    def renew(self, task_ids: Iterable[str]) -> None:
        """Refresh the leases of the tasks this instance runs."""
        for task_id in task_ids:
            try:
                # A lease that is gone (recovered and cleaned up elsewhere,
                # or never claimed) is no error: renew says False.
                self.leases.renew(self._dir(task_id) / OWNER)
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
        self._writer.forget(task_id)
        self.attempts.pop(task_id, None)
        self._disown(task_id)
        if not final:
            self.leases.release(self._dir(task_id) / OWNER)

    def request_cancel(self, task_id: str) -> bool:
        """Ask whichever instance runs the task to cancel it; False if unknown or final."""
        d = self._dir(task_id)
        if not d.is_dir() or self.is_final(task_id):
            return False
        publish(d, CANCEL, dumps_bytes({"instance_id": self.instance_id}))
        return True

    def cancel_requested(self, task_id: str) -> bool:
        """Whether any instance asked to cancel the task."""
        return (self._dir(task_id) / CANCEL).exists()

    def owner(self, task_id: str) -> str | None:
        """The instance id that claimed the task, or None."""
        return self.leases.holder(self._dir(task_id) / OWNER)

    # ------------------------------------------------------------ orphans
    def _renewed_at(self, d: Path) -> float:
        try:
            return self.leases.renewed_at(d / OWNER)
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
        now = self.leases.clock() if now is None else now
        self._spares.sweep()  # spare folders of instances that died
        lost: list[str] = []
        index = self.open_index
        full = not index.complete()
        # The open index names the tasks to look at; a log from before it
        # (no marker yet) gets one scan of every folder, which indexes them.
        for task_id in self.task_ids() if full else index.names():
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
            if now - renewed > self.lease_seconds and self._close_lost(task_id, renewed, now):
                lost.append(task_id)
        if full:
            index.mark_complete()
        return lost

    def _close_lost(self, task_id: str, renewed: float, now: float) -> bool:
        """Write the ``task_lost`` final event of a task whose lease was
        last renewed at ``renewed``; whether it counted."""
        owner = self.owner(task_id) or "unknown"
        if renewed == RELEASED:  # see release(): given up, not expired
            message = (f"the instance running this task ({owner}) released it "
                       f"without a final event")
        else:
            message = (f"the instance running this task stopped (lease expired): "
                       f"{owner} did not renew it for {now - renewed:.0f}s "
                       f"(lease {self.lease_seconds:g}s)")
        event = final_event(task_id, None, {}, error={
            "type": "task_lost", "message": message, "node_errors": {}})
        event["data"]["attempt"] = attempt_of(self.root / task_id)
        self._writer.forget(task_id)  # the owner may have written since
        _, won = self._write(task_id, [(None, event)])
        self._writer.forget(task_id)
        if won:
            log.warning("tasklog: task %s lost: %s", task_id, message)
        return won

    # --- safety (issue 9): the API key that owns a task ---------------------
    def set_key_hash(self, task_id: str, key_hash: str) -> None:
        """Record (once) the hash of the API key that created the task. The
        key itself is never written; only a one-way hash of it."""
        publish(self._dir(task_id), KEY, key_hash.encode("ascii"), durable=True)

    def key_hash(self, task_id: str) -> str | None:
        """The recorded key hash of the task, or None (unknown task, or
        created with authentication off)."""
        try:
            return (self._dir(task_id) / KEY).read_text("ascii").strip() or None
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
