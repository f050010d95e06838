"""Persisted per-task event log on a filesystem that several instances share.

``<root>/<task_id>/`` holds ``owner.json`` (who claimed it; its mtime is the
lease), one file per event (``00000001.json``, ...), ``final`` (the seq of the
terminal event) and ``cancel`` (a cancel request).

NFS or an object-storage mount (ossfs) may not append or rename over a name
reliably, so no file is modified in place: each is written under a hidden temp
name (leading ``.``, ignored by readers) and published with ``os.link``, which
fails if the name exists: atomic (no half events) and exclusive (no shared
seq). Without hard links, an ``O_EXCL`` hidden lock reserves the name and the
fresh temp file is renamed to it.

Exactly one terminal event: a finisher publishes its ``serverless_api`` event,
then exclusively the ``final`` marker naming its seq. Only the marker's event
is ever returned; readers stop before a terminal event with no marker yet, and
skip one whose writer lost the race (the owner and a recovering instance).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["FINAL_TYPE", "TaskLog", "DeliveryLog"]

log = logging.getLogger(__name__)

FINAL_TYPE = "serverless_api"

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SEQ_RE = re.compile(r"(\d{8,})\.json")
_OWNER = "owner.json"
_FINAL = "final"
_CANCEL = "cancel"
# errnos by which a filesystem says "no hard links here" (FUSE mounts, SMB...).
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


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


def _publish(directory: Path, name: str, payload: bytes, durable: bool = False) -> bool:
    """Create ``directory/name`` holding ``payload`` atomically, only if absent."""
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    final = directory / name
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            try:
                os.close(os.open(directory / f".{name}.lock",
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return False
            if final.exists():
                return False
            # The reservation is ours, so nobody else renames onto this name.
            os.rename(tmp, final)
        if durable:
            _fsync_dir(directory)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        # Never a half-written event (publishing is atomic): real corruption.
        log.warning("tasklog: skipping undecodable event file %s", path)
        return None
    return value if isinstance(value, dict) else None


class TaskLog:
    """The event logs of all tasks under ``root``, shared by several instances.

    ``instance_id`` names this instance in the leases it takes. An owner must
    call :meth:`renew` more often than every ``lease_seconds`` for the tasks it
    runs; a task whose lease expired without a final event is closed by
    :meth:`recover_orphans` on any instance. ``clock`` gives the wall-clock
    time written into leases (tests pass a fake one). All methods block on
    file I/O: call them from a worker thread. Invalid task ids raise
    ``ValueError``; callers check :meth:`valid_task_id` first.
    """

    def __init__(self, root: Path, instance_id: str, lease_seconds: float = 30.0, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.instance_id = instance_id
        self.lease_seconds = lease_seconds
        self._clock = clock
        # Highest seq this instance wrote per task: saves listing the directory
        # on every append. A stale value only costs a few failed links.
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def valid_task_id(task_id: str) -> bool:
        """Whether ``task_id`` is safe as a directory name: [A-Za-z0-9._-]{1,128}."""
        return (isinstance(task_id, str) and task_id not in (".", "..")
                and _ID_RE.fullmatch(task_id) is not None)

    def _dir(self, task_id: str) -> Path:
        if not self.valid_task_id(task_id):
            raise ValueError(f"invalid task id {task_id!r}")
        return self.root / task_id

    def _touch(self, path: Path, when: float | None = None) -> None:
        t = self._clock() if when is None else when
        os.utime(path, (t, t))

    def claim(self, task_id: str) -> bool:
        """Create the task with this instance as owner; False if it already exists."""
        d = self._dir(task_id)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            d.mkdir()
        except FileExistsError:
            return False
        owner = {"instance_id": self.instance_id, "claimed_at": self._clock()}
        _publish(d, _OWNER, json.dumps(owner).encode())
        self._touch(d / _OWNER)
        return True

    def discard(self, task_id: str) -> None:
        """Undo this instance's :meth:`claim` of a task that was never
        accepted (queue full, draining), so a retry can claim it again."""
        d = self._dir(task_id)
        if self.owner(task_id) != self.instance_id or _seqs(_listdir(d)):
            return
        shutil.rmtree(d, ignore_errors=True)
        with self._lock:
            self._last.pop(task_id, None)

    def append(self, task_id: str, event: dict[str, Any]) -> int:
        """Persist ``event`` (``{"type", "data"}``) as the task's next event; return its seq.

        A terminal event (type ``FINAL_TYPE``) is fsynced before returning.
        Once the task has a terminal event nothing more is accepted: the
        existing final's seq is returned instead.
        """
        return self._append(task_id, event)[0]

    def _append(self, task_id: str, event: dict[str, Any]) -> tuple[int, bool]:
        """Like :meth:`append`; the flag is False when the event did not count."""
        d = self._dir(task_id)
        final = self._final_hint(d)
        if final is not None:
            return final, False
        is_final = event.get("type") == FINAL_TYPE
        payload = json.dumps(event, separators=(",", ":")).encode()
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            seq = self._last.get(task_id, 0) + 1
        if seq == 1:
            seq = max(_seqs(_listdir(d)), default=0) + 1
        while not _publish(d, f"{seq:08d}.json", payload, durable=is_final):
            seq += 1  # another writer took it: try the next number
        with self._lock:
            self._last[task_id] = max(self._last.get(task_id, 0), seq)
        if is_final:
            if _publish(d, _FINAL, str(seq).encode(), durable=True):
                return seq, True
            # Lost the race: ours stays hidden. Without hard links the winner
            # reserves the marker before renaming it in, so give it a moment.
            deadline = time.monotonic() + 5.0
            while (final := self._final_hint(d)) is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if final is None:
                log.error("tasklog: task %s: final marker reserved but never written", task_id)
            return final or seq, False
        final = self._final_hint(d)
        # Landed after a final (raced it): readers stop at the final, never see it.
        return (final, False) if final is not None and final < seq else (seq, True)

    def _final_hint(self, d: Path) -> int | None:
        try:
            return int((d / _FINAL).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _gap_pending(self, d: Path, lo: int, hi: int, names: set[str]) -> bool:
        """Whether a writer still holds a reservation for a seq in [lo, hi)."""
        for s in range(lo, hi):
            lock = f".{s:08d}.json.lock"
            if lock in names:
                try:
                    age = time.time() - os.stat(d / lock).st_mtime
                except FileNotFoundError:
                    continue
                if age < self.lease_seconds:  # else its writer died: skip the hole
                    return True
        return False

    def read(self, task_id: str, since: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """Events with seq > ``since`` as ``(seq, event)``, in order, up to the final one.

        An unknown task gives ``[]``. Safe while other instances write: an
        event once returned never gets an earlier-seq event inserted before it.
        """
        d = self._dir(task_id)
        final = self._final_hint(d)  # before listing: its event is then listed
        names = _listdir(d)
        out: list[tuple[int, dict[str, Any]]] = []
        expected = since + 1
        for seq in _seqs(names):
            if seq <= since:
                continue
            if final is not None and seq > final:
                break
            # Only the no-hard-link fallback can leave a hole while a writer is
            # mid-publish; stop there so a poller using ``since`` misses nothing.
            if seq > expected and self._gap_pending(d, expected, seq, names):
                break
            expected = seq + 1
            event = _load(d / f"{seq:08d}.json")
            if event is None:
                continue
            if event.get("type") == FINAL_TYPE and seq != final:
                if final is None:
                    break  # its marker comes next, unless it loses a race
                continue  # lost the race for the marker
            out.append((seq, event))
        return out

    def is_final(self, task_id: str) -> bool:
        """Whether the task has its terminal event."""
        return self._final_hint(self._dir(task_id)) is not None

    def exists(self, task_id: str) -> bool:
        """Whether the task was claimed (or written to) by any instance."""
        return self._dir(task_id).is_dir()

    def renew(self, task_ids: Iterable[str]) -> None:
        """Refresh the leases of the tasks this instance runs."""
        for task_id in task_ids:
            try:
                self._touch(self._dir(task_id) / _OWNER)
            except FileNotFoundError:
                pass  # recovered and cleaned up elsewhere, or never claimed
            except OSError as exc:
                log.warning("tasklog: cannot renew lease of task %s: %s", task_id, exc)

    def release(self, task_id: str) -> None:
        """Give up ownership (normally after the final event).

        The lease is expired at once, so a task released without a final event
        is closed by the next :meth:`recover_orphans` instead of hanging.
        """
        with self._lock:
            self._last.pop(task_id, None)
        try:
            self._touch(self._dir(task_id) / _OWNER, when=0.0)
        except FileNotFoundError:
            pass

    def request_cancel(self, task_id: str) -> bool:
        """Ask whichever instance runs the task to cancel it; False if unknown or final."""
        d = self._dir(task_id)
        if not d.is_dir() or self.is_final(task_id):
            return False
        _publish(d, _CANCEL, json.dumps({"instance_id": self.instance_id}).encode())
        return True

    def cancel_requested(self, task_id: str) -> bool:
        """Whether any instance asked to cancel the task."""
        return (self._dir(task_id) / _CANCEL).exists()

    def owner(self, task_id: str) -> str | None:
        """The instance id that claimed the task, or None."""
        info = _load(self._dir(task_id) / _OWNER)
        value = info.get("instance_id") if info else None
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
        for task_id in sorted(_listdir(self.root)):
            d = self.root / task_id
            if not self.valid_task_id(task_id) or not d.is_dir():
                continue
            try:
                idle = now - self._renewed_at(d)
            except FileNotFoundError:
                continue
            if idle <= self.lease_seconds or self.is_final(task_id):
                continue
            owner = self.owner(task_id) or "unknown"
            message = (f"the instance running this task stopped (lease expired): "
                       f"{owner} did not renew it for {idle:.0f}s "
                       f"(lease {self.lease_seconds:g}s)")
            event = {"type": FINAL_TYPE, "data": {
                "status": "error", "task_id": task_id, "prompt_id": None, "seeds": {},
                "results": [], "error": {"type": "task_lost", "message": message,
                                         "node_errors": {}}}}
            _, won = self._append(task_id, event)
            with self._lock:
                self._last.pop(task_id, None)
            if won:
                log.warning("tasklog: task %s lost: %s", task_id, message)
                lost.append(task_id)
        return lost


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

    @property
    def lease_seconds(self) -> float:
        return self.tasklog.lease_seconds

    def _dir(self, task_id: str) -> Path:
        return self.tasklog._dir(task_id)

    def register(self, task_id: str, request: dict[str, Any]) -> bool:
        """Record the task's webhook request; False if it already has one."""
        d = self._dir(task_id)
        d.mkdir(parents=True, exist_ok=True)
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
        return _publish(self._dir(task_id), _WEBHOOK_DONE, json.dumps(record).encode(),
                        durable=True)

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
        free or expired: deliveries some instance should (re)start."""
        out: list[str] = []
        now = self.tasklog._clock()
        for task_id in sorted(_listdir(self.tasklog.root)):
            d = self.tasklog.root / task_id
            if not self.tasklog.valid_task_id(task_id) or not (d / _WEBHOOK).exists():
                continue
            if (d / _WEBHOOK_DONE).exists() or not self.tasklog.is_final(task_id):
                continue
            gens = self._generations(_listdir(d))
            if gens:
                try:
                    if now - os.stat(d / f"webhook.lease.{gens[-1]:04d}").st_mtime <= self.lease_seconds:
                        continue
                except FileNotFoundError:
                    pass
            out.append(task_id)
        return out
