"""Indexes of the shared task log, so that periodic scans stay cheap.

Every instance looks for orphaned tasks and for webhooks to resume every
15 seconds. Listing every task folder kept for the retention period costs a
stat or a read per folder, under the GIL the executor thread needs: about
80-200 ms per scan at 10,000 tasks on a 2-core VM, growing with the log.
An index names only the tasks a scan is about, one file per task (its
content is never read):

- ``<root>/@index/open/<task_id>``: claimed, no final event yet; the file is
  the task's lease too (``owner.json`` is a hard link of it, log.py: one
  file created per claim), so it holds the lease's record;
- ``<root>/@index/webhooks/<task_id>``: a webhook not yet done;
- ``<root>/@index/done/<bucket>/<task_id>``: finished, by when (buckets of
  :data:`BUCKET_SECONDS`), so that retention looks only at tasks old
  enough to delete instead of stat-ing every folder every minute;
- ``<root>/@index/expires/<bucket>/<task_id>``: tasks with a retention of
  their own (``?ttl=``, keep nothing; expiry.py), by when they may expire.

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

__all__ = ["NameIndex", "DoneIndex", "INDEX_FOLDER", "BUCKET_SECONDS"]

#: The folder under the log root that holds the indexes.
INDEX_FOLDER = "@index"
_COMPLETE = ".complete"
#: Width of a bucket of the done index: retention deletes a task at most
#: this much later than its age allows.
BUCKET_SECONDS = 10


def _create(folder: Path, name: str, payload: bytes = b"", exclusive: bool = False) -> None:
    """A file ``folder/name`` (kept if it exists; FileExistsError instead
    when ``exclusive``), holding ``payload`` when new; the folder is made on
    first use."""
    path = os.path.join(folder, name)
    flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    try:
        if payload:
            os.write(fd, payload)
    finally:
        os.close(fd)


class _Index:
    """A folder of an index, with the marker of its one full scan. Every
    method blocks on file I/O (call from a worker thread)."""

    def __init__(self, root: Path, name: str) -> None:
        self.folder = Path(root) / INDEX_FOLDER / name

    def complete(self) -> bool:
        """Whether every task that belongs in it is indexed (a full scan was made)."""
        return (self.folder / _COMPLETE).exists()

    def mark_complete(self) -> None:
        _create(self.folder, _COMPLETE)


class NameIndex(_Index):
    """One index: a folder of files named by task id."""

    def add(self, task_id: str) -> None:
        _create(self.folder, task_id)

    def add_new(self, task_id: str, payload: bytes) -> str | None:
        """A new entry holding ``payload`` (an entry's content is never read:
        the caller may link the file elsewhere); its path, or None when an
        entry was there already (kept as it is)."""
        try:
            _create(self.folder, task_id, payload, exclusive=True)
        except FileExistsError:
            return None
        return os.path.join(self.folder, task_id)

    def add_link(self, task_id: str, source: Path) -> bool:
        """A new entry that is a hard link of ``source`` (the task's lease);
        False when an entry was there already (kept as it is)."""
        path = os.path.join(self.folder, task_id)
        try:
            try:
                os.link(source, path)
            except FileNotFoundError:  # the folder, on first use
                self.folder.mkdir(parents=True, exist_ok=True)
                os.link(source, path)
        except FileExistsError:
            return False
        return True

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


class DoneIndex(_Index):
    """Finished tasks by the time they finished: ``done/<bucket>/<task_id>``,
    ``<bucket>`` being that time // :data:`BUCKET_SECONDS`."""

    def __init__(self, root: Path, name: str = "done") -> None:
        super().__init__(root, name)

    def add(self, task_id: str, when: float, *, moving_from: NameIndex | None = None) -> None:
        """Index ``task_id`` as finished at ``when``; ``moving_from``: take its
        entry from that index (one rename instead of a create and an unlink)."""
        bucket = self.folder / str(int(when // BUCKET_SECONDS))
        if moving_from is not None:
            source = os.path.join(moving_from.folder, task_id)
            target = os.path.join(bucket, task_id)
            try:
                os.rename(source, target)
                return
            except FileNotFoundError:
                if not bucket.is_dir():  # the bucket's first task
                    bucket.mkdir(parents=True, exist_ok=True)
                    try:
                        os.rename(source, target)
                        return
                    except FileNotFoundError:
                        pass
            # No entry to move (a log from before the index): make one.
        _create(bucket, task_id)

    def older_than(self, cutoff: float) -> list[tuple[Path, list[str]]]:
        """``(bucket folder, task ids)`` of the buckets that ended by ``cutoff``."""
        out: list[tuple[Path, list[str]]] = []
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return out
        for name in sorted(names, key=lambda n: (len(n), n)):
            if name.isdigit() and (int(name) + 1) * BUCKET_SECONDS <= cutoff:
                bucket = self.folder / name
                try:
                    out.append((bucket, sorted(os.listdir(bucket))))
                except (FileNotFoundError, NotADirectoryError):
                    continue
        return out
