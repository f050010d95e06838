"""Reading a task's events back, safe while other instances write.

Readers stop before a placeholder with no ``final`` yet, and skip one whose
writer lost the race (writer.py says why they are there). Logs written by
earlier versions (one event per file, ``final`` holding only a seq, or its
event with the placeholder in a segment, uncompressed) are still read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from comfy_embed.events import FINAL
from comfy_embed.tasklog.blobs import inline_blobs
from comfy_embed.tasklog.files import (
    LOCK_RE,
    FinalMarker,
    event_pairs,
    listdir,
    load,
    read,
    read_final,
    segment_name,
    segment_seqs,
)

__all__ = ["read_events"]


def _final_event(d: Path, final: FinalMarker, root: Path) -> dict[str, Any] | None:
    if final.event is None:
        return None
    blob = read(d / final.blob) if final.blob else None
    return inline_blobs(final.event, blob, root, str(d))


def _pending(d: Path, lo: int, hi: int, names: set[str], lease_seconds: float) -> bool:
    """Whether a live writer still holds a reservation for a seq in [lo, hi)."""
    for m in map(LOCK_RE.fullmatch, names):
        if m and lo <= int(m.group(1)) < hi and segment_name(int(m.group(1))) not in names:
            try:
                age = time.time() - os.stat(d / m.group(0)).st_mtime
            except FileNotFoundError:
                continue
            if age < lease_seconds:  # else its writer died: skip the hole
                return True
    return False


def read_events(d: Path, since: int, root: Path, lease_seconds: float
                ) -> list[tuple[int, dict[str, Any]]]:
    """The events of the task folder ``d`` with seq > ``since``, as
    :meth:`~.log.TaskLog.read` gives them. ``root``: the log root (output
    files are referenced relative to it); ``lease_seconds``: how long a
    no-hard-link reservation is waited for."""
    final = read_final(d)  # before listing: its segment is then listed
    names = listdir(d)
    segs = segment_seqs(names)
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
        if first > expected and _pending(d, expected, first, names, lease_seconds):
            return out
        pairs = event_pairs(load(d / segment_name(first)), first)
        for seq, event in pairs:
            if seq <= since:
                continue
            if final is not None and seq > end:
                if final.first is None:
                    return out
                break
            if event.get("type") == FINAL:
                if final is None:
                    return out  # its marker comes next, unless it loses a race
                if seq != final.seq:
                    continue  # lost the race for the marker
                full = _final_event(d, final, root) if final.event is not None else event
                if full is not None:
                    out.append((seq, full))
                return out
            out.append((seq, event))
        if pairs:
            expected = max(expected, pairs[-1][0] + 1)
    if final is not None and final.first is not None:
        if final.seq > since and not _pending(d, expected, final.first, names, lease_seconds):
            out.extend((seq, event) for seq, event in final.events if seq > since)
            full = _final_event(d, final, root)
            if full is not None:
                out.append((final.seq, full))
        return out
    if final is not None and final.event is not None and final.seq > since:
        # The segment holding its placeholder was lost (a machine crash):
        # the final event itself is durable.
        if not _pending(d, expected, final.seq, names, lease_seconds):
            full = _final_event(d, final, root)
            if full is not None:
                out.append((final.seq, full))
    return out
