"""Writing a task's events: the chain of segments, then exactly one ``final``.

Exactly one terminal event, whoever writes it: ``final`` is published
exclusively. Only the owner (the :class:`~.log.TaskLog` that claimed the
task, its writes serialised) writes other events; another instance writes
only a terminal event (recovering a lost task), and first publishes a
segment ending with a ``serverless_api`` placeholder, which reserves its seq
in the chain, so that no segment of the owner's at that seq can be read
before that final appears with a lower seq. The owner's ``final`` comes
after its own chain, so readers take its ``events`` in place of any segment
from ``from`` on (only placeholders of finishers that lost the race can be
there). Durability: the answer to a caller waits for ``final`` to be
written, and its fsync follows the answer (``TaskLog.settle_final``; other
writers' finals are fsynced at once); segments and the blob are written
without fsync. So a crash of the process (kill -9) loses nothing, and a
crash of the machine can lose progress, inlined images and a final event
written in the last moment before it (whose task the recovery scan then
closes as lost), like the output files, which nobody fsyncs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from comfy_embed.events import FINAL
from comfy_embed.tasklog.blobs import split_blobs
from comfy_embed.tasklog.files import (
    FINAL_FILE,
    LOCK_RE,
    PLACEHOLDER,
    SpareFile,
    encode,
    event_pairs,
    listdir,
    load,
    lock_name,
    publish,
    read,
    read_final,
    segment_name,
    segment_seqs,
)

__all__ = ["Pair", "Records", "Writer"]

log = logging.getLogger(__name__)

#: A ``(seq, event)`` to write; seq None: the next one.
Pair = tuple[int | None, dict[str, Any]]
#: Records written into ``final`` with the terminal event: name -> JSON bytes.
Records = Mapping[str, bytes]
#: How long a writer waits for a no-hard-link reservation to name its range.
_RESERVATION_WAIT = 2.0
#: The owner's last flush goes into ``final`` up to this size (compressed);
#: a larger one is a segment of its own, so the fsynced file stays small.
_EMBED_LIMIT = 64 * 1024


class Writer:
    """Writes the segments and final files of the tasks under ``root``;
    ``closed(task_id)`` is called once a task's final event counted."""

    def __init__(self, root: Path, closed: Callable[[str], None],
                 output_root: Path | None = None) -> None:
        self.root = root
        self._closed = closed
        # Last seq of the chain as this instance last wrote it, per task: saves
        # listing the directory on every write. A stale value only costs one
        # failed link (only the writer of a segment can extend the chain past it).
        self._end: dict[str, int] = {}
        self._lock = threading.Lock()
        self._resolved_root: str | None = None
        #: What a result's relative ``comfy.dir`` is relative to.
        self._output_root = None if output_root is None else os.path.realpath(output_root)

    def started(self, task_id: str) -> None:
        """The task's folder is new, so its chain is empty: its first write
        needs no listing to learn where it starts (see :meth:`_next_seq`)."""
        with self._lock:
            self._end[task_id] = 0

    def forget(self, task_id: str) -> None:
        """Drop what this instance knows of the task's chain (others may
        have written since): the next write looks at the folder."""
        with self._lock:
            self._end.pop(task_id, None)

    def _root(self) -> str:
        if self._resolved_root is None:
            self._resolved_root = os.path.realpath(self.root)
        return self._resolved_root

    # ------------------------------------------------------------- writing
    def owner_final(self, d: Path, task_id: str, pairs: list[Pair],
                    records: Records | None = None, *, durable: bool = True,
                    spare: SpareFile | None = None) -> tuple[int, bool]:
        """The owner's last flush, ending with the terminal event, all in the
        final file (no placeholder: the owner is the only writer of other
        events, see the module doc). No look for a final first: publishing
        one is exclusive, and a final already there (a recovery that took
        this instance for dead) makes it lose as a look would (see
        :meth:`_finish`). ``records`` go into the final file with it;
        ``durable``: fsynced before this returns (else the caller syncs it);
        ``spare``: the final file made beforehand in ``d``."""
        first = self._next_seq(d, task_id)
        items = self._number(task_id, first, pairs[:-1])
        seq = pairs[-1][0]
        nxt = items[-1][0] + 1 if items else first
        seq = nxt if seq is None or seq < nxt else seq
        try:
            return self._finish(d, task_id, seq, pairs[-1][1], first, items, records, durable, spare)
        except FileNotFoundError:
            if d.is_dir():
                raise
            # Its folder was deleted under it: the final event still lands.
            d.mkdir(parents=True, exist_ok=True)
            return self._finish(d, task_id, seq, pairs[-1][1], first, items, records, durable)

    def _number(self, task_id: str, first: int, pairs: Sequence[Pair]
                ) -> list[tuple[int, dict[str, Any]]]:
        """Seqs for pairs written from ``first`` on: a pair without one gets
        the next; a terminal event the next free; other pairs whose seq was
        taken by another writer are dropped."""
        items: list[tuple[int, dict[str, Any]]] = []
        nxt = first
        for seq, ev in pairs:
            terminal = ev.get("type") == FINAL
            if seq is None or (seq < nxt and terminal):
                seq = nxt
            elif seq < nxt:
                log.warning("tasklog: task %s: seq %d was taken by another writer; "
                            "event dropped", task_id, seq)
                continue
            items.append((seq, PLACEHOLDER if terminal else ev))
            nxt = seq + 1
        return items

    def chain(self, d: Path, task_id: str, pairs: Sequence[Pair],
              is_final: bool, records: Records | None = None) -> tuple[int, bool]:
        """Publish pairs as the next segment of the chain (a terminal event as
        its placeholder, then ``final`` naming it). Returns the last seq that
        counts (or the final's) and whether they counted."""
        while True:
            first = self._next_seq(d, task_id)
            items = self._number(task_id, first, pairs)
            if not items:
                return first - 1, False
            end = items[-1][0]
            if publish(d, segment_name(first), encode(items), reservation=str(end).encode()):
                break
            self.forget(task_id)  # another writer extended the chain
            if (final := read_final(d)) is not None:
                return final.seq, False
        with self._lock:
            self._end[task_id] = end
        if not is_final:
            final = read_final(d)
            # Landed after a final (raced it): readers stop at the final, never see it.
            if final is not None and (final.seq < end or (final.first is not None
                                                          and first >= final.first)):
                return final.seq, False
            return end, True
        return self._finish(d, task_id, end, pairs[-1][1], records=records)

    def _finish(self, d: Path, task_id: str, seq: int, event: dict[str, Any],
                first: int | None = None, events: Sequence[tuple[int, dict[str, Any]]] = (),
                records: Records | None = None, durable: bool = True,
                spare: SpareFile | None = None) -> tuple[int, bool]:
        """Publish ``final``: ``event`` at ``seq``, with ``events`` from
        ``first`` on (the owner), or named by a placeholder (``first`` None),
        and ``records`` (JSON bytes, embedded as they are); fsynced when
        ``durable``."""
        stripped, blob = split_blobs(event, self._root(), self._output_root)
        blob_name = None
        if blob:
            blob_name = f"{FINAL_FILE}.{uuid.uuid4().hex}.blob"
            publish(d, blob_name, blob)
        marker: dict[str, Any] = {"seq": seq, "event": stripped, "blob": blob_name}
        if first is not None:
            marker.update({"from": first, "events": list(events)})
        if records:
            marker["records"] = {name: orjson.Fragment(raw) for name, raw in records.items()}
        payload = encode(marker)
        if events and len(payload) > _EMBED_LIMIT:
            # Too much to fsync cheaply: the events get a segment of their own.
            end, ok = self.chain(d, task_id, list(events), False)
            if not ok:  # a final came meanwhile
                if blob_name:
                    (d / blob_name).unlink(missing_ok=True)
                return end, False
            seq = max(seq, end + 1)
            marker.update({"seq": seq, "from": end + 1, "events": []})
            payload = encode(marker)
        if publish(d, FINAL_FILE, payload, durable=durable, spare=spare):
            with self._lock:
                self._end[task_id] = seq
            self._closed(task_id)
            return seq, True
        # Lost the race: ours stays hidden. Without hard links the winner
        # reserves the marker before renaming it in, so give it a moment.
        if blob_name:
            (d / blob_name).unlink(missing_ok=True)
        deadline = time.monotonic() + 5.0
        while (final := read_final(d)) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if final is None:
            log.error("tasklog: task %s: final marker reserved but never written", task_id)
        return (final.seq if final else seq), False

    # ------------------------------------------------- where the chain ends
    def _next_seq(self, d: Path, task_id: str) -> int:
        """The first seq after the chain: after this instance's last write, or
        after what the directory shows."""
        with self._lock:
            end = self._end.get(task_id)
        if end is not None:
            return end + 1
        names = listdir(d)
        end = 0
        segs = segment_seqs(names)
        if segs:
            last = segs[-1]
            found = event_pairs(load(d / segment_name(last)), last)
            end = found[-1][0] if found else last
        # A no-hard-link reservation past the last segment: its writer is
        # publishing (or died); its range is taken either way.
        for m in map(LOCK_RE.fullmatch, names):
            if m and int(m.group(1)) > end:
                end = max(end, _reserved_end(d, int(m.group(1))))
        return end + 1


def _reserved_end(d: Path, first: int) -> int:
    """The last seq of the range that a no-hard-link reservation at ``first`` took."""
    deadline = time.monotonic() + _RESERVATION_WAIT
    while True:
        raw = read(d / lock_name(first))
        if raw and raw.strip().isdigit():
            return int(raw)
        if raw is None or time.monotonic() > deadline:
            return first  # written by an earlier version, or its writer died
        time.sleep(0.002)
