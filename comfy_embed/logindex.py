"""Indexes of the shared task log, so that periodic scans stay cheap.

Every instance looks for orphaned tasks and for webhooks to resume every
15 seconds. Listing every task folder kept for the retention period costs a
stat or a read per folder, under the GIL the executor thread needs: about
80-200 ms per scan at 10,000 tasks on a 2-core VM, growing with the log.
An index names only the tasks a scan is about, one empty file per task:

- ``<root>/@index/open/<task_id>``: claimed, no final event yet;
- ``<root>/@index/webhooks/<task_id>``: a webhook not yet done.

``@`` is outside the task-id rule (taskid.py), so no task folder collides
with it. An entry is added before the state it marks exists and dropped
after that state ended, so a crash in between leaves an extra entry (the
scan checks the task folder and drops it), never a missing one. Logs from
before the index have no entries: the first scan of an index without its
``.complete`` marker looks at every task folder, indexes what it needs,
then writes the marker. Instances sharing a log must all maintain the index.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NameIndex", "INDEX_FOLDER"]

#: The folder under the log root that holds the indexes.
INDEX_FOLDER = "@index"
_COMPLETE = ".complete"


class NameIndex:
    """One index: a folder of empty files named by task id. Every method
    blocks on file I/O (call from a worker thread)."""

    def __init__(self, root: Path, name: str) -> None:
        self.folder = Path(root) / INDEX_FOLDER / name

    def add(self, task_id: str) -> None:
        path = os.path.join(self.folder, task_id)
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        except FileNotFoundError:  # the first entry of this log
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)

    def drop(self, task_id: str) -> None:
        try:
            os.unlink(os.path.join(self.folder, task_id))
        except FileNotFoundError:
            pass

    def names(self) -> list[str]:
        """The indexed task ids, sorted."""
        try:
            return sorted(n for n in os.listdir(self.folder) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def complete(self) -> bool:
        """Whether every task that belongs in it is indexed (a full scan was made)."""
        return (self.folder / _COMPLETE).exists()

    def mark_complete(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.folder / _COMPLETE, os.O_CREAT | os.O_WRONLY, 0o644))
