"""``Idempotency-Key`` with Stripe's semantics, across every instance that
shares the task log folder.

One file per (owner, key) in ``<log>/@v2/idempotency/``, named by a hash of
both (the key itself is the client's and never written). The first request
creates it exclusively (``O_EXCL``) as *pending*; its answer replaces it
(atomic rename) as *done* with the status, headers and body to replay. So:

- same key, same body, done: the recorded answer again (``replayed``);
- same key, another body: ``reuse`` (422 ``idempotency_key_reuse``);
- same key while the first is still pending: ``in_flight`` (409 with
  Retry-After); a pending record older than ``stale_seconds`` belongs to an
  instance that died mid-request and is taken over;
- a refused request (validation, queue full) leaves no record, so a
  corrected retry with the same key runs (Stripe keeps no result for a
  request that never started executing either);
- records older than ``hours`` are ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["IdempotencyStore", "Outcome", "body_hash"]


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """What :meth:`IdempotencyStore.begin` found."""

    #: "new" (go ahead, then finish or abandon), "replay", "reuse" or "in_flight".
    kind: str
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] | None = None


class IdempotencyStore:
    """Idempotency records under ``root`` (blocking file I/O: use a thread)."""

    def __init__(self, root: Path, hours: float, stale_seconds: float) -> None:
        self.folder = Path(root) / "@v2" / "idempotency"
        self.seconds = hours * 3600
        self.stale = stale_seconds

    def _path(self, owner: str, key: str) -> Path:
        digest = hashlib.sha256(f"{owner}\x00{key}".encode("utf-8", "surrogatepass")).hexdigest()
        return self.folder / digest

    def begin(self, owner: str, key: str, fingerprint: str, now: float | None = None) -> Outcome:
        """Claim the key for this request, or say what the earlier one left."""
        now = time.time() if now is None else now
        path = self._path(owner, key)
        for _ in range(3):
            if self._create(path, {"state": "pending", "fingerprint": fingerprint, "at": now}):
                return Outcome("new")
            record = self._read(path)
            if record is None:
                continue  # removed meanwhile: try again
            age = now - float(record.get("at", 0))
            if age > self.seconds or (record.get("state") == "pending" and age > self.stale):
                self._remove(path, record)
                continue
            if record.get("fingerprint") is None:
                return Outcome("in_flight")  # being written
            if record.get("fingerprint") != fingerprint:
                return Outcome("reuse")
            if record.get("state") != "done":
                return Outcome("in_flight")
            return Outcome("replay", int(record["status"]), record["body"].encode(),
                           dict(record.get("headers") or {}))
        return Outcome("in_flight")

    def finish(self, owner: str, key: str, fingerprint: str, status: int, body: bytes,
               headers: dict[str, str]) -> None:
        """Record the answer to replay (replaces the pending record)."""
        path = self._path(owner, key)
        payload = json.dumps({"state": "done", "fingerprint": fingerprint, "at": time.time(),
                              "status": status, "body": body.decode(), "headers": headers})
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        # Not fsynced, as the task's own claim is not (only final events are).
        with open(tmp, "w") as f:
            f.write(payload)
        os.replace(tmp, path)

    def abandon(self, owner: str, key: str) -> None:
        """The request was refused before it ran: no record stays."""
        try:
            os.unlink(self._path(owner, key))
        except FileNotFoundError:
            pass

    def prune(self, now: float | None = None) -> int:
        """Delete the records past their lifetime (and temporary files a
        crash left); how many. One listing and a stat per record: run it
        rarely (JobService does, about hourly), in a worker thread."""
        cutoff = (time.time() if now is None else now) - self.seconds - self.stale
        removed = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _create(self, path: Path, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            return self._create(path, record)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            # Created, not yet written (O_EXCL then write): a request in flight.
            return {"state": "pending", "at": os.stat(path).st_mtime if path.exists() else 0}
        return value if isinstance(value, dict) else None

    @staticmethod
    def _remove(path: Path, seen: dict[str, Any]) -> None:
        """Drop an expired or stale record (only the one seen: a rename
        elsewhere since leaves the new record)."""
        try:
            current = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            current = None
        if current == seen or current is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
