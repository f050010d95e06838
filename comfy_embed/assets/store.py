"""Asset records and blobs under ``<task log>/@v2/assets/`` (shared by every
instance of a fleet, like the task log itself):

- ``blobs/<h[:2]>/<h>``: the bytes, named by their blake3 hex digest, written
  once (a temporary file renamed into place: never seen half-written);
- ``records/<asset id>``: one JSON record per asset (id, hash, size, type,
  file path, owner, when);
- ``refs/<h>/<asset id>``: one empty file per asset over the blob; deleting
  the last asset deletes the bytes;
- ``owners/<owner>/<h>``: an empty file saying that ``owner`` uploaded those
  bytes, so it may mint more assets over them by hash (``from-hash``) and
  no one else can learn that the blob exists.

All methods block on file I/O (call them from a worker thread).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import blake3

__all__ = ["HASH_RE", "AssetRecord", "AssetStore", "Hasher", "parse_hash"]

#: ``blake3:<64 hex>`` (lower case), as clients write hashes.
HASH_RE = re.compile(r"blake3:([0-9a-f]{64})")
_ID_RE = re.compile(r"asset_[0-9a-f]{32}")
_CHUNK = 1 << 20


def parse_hash(value: str) -> str | None:
    """The hex digest of a ``blake3:<hex>`` string, else None."""
    m = HASH_RE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    return m.group(1) if m else None


@dataclass
class AssetRecord:
    id: str
    hash: str
    size_bytes: int
    content_type: str
    file_path: str | None
    owner: str
    created_at: float
    tags: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return self.hash.split(":", 1)[1]


class Hasher:
    """Bytes written to a temporary blob file while their blake3 is computed."""

    def __init__(self, store: AssetStore) -> None:
        self.store = store
        self.tmp = store.blobs / f".upload-{uuid.uuid4().hex}"
        store.blobs.mkdir(parents=True, exist_ok=True)
        self._f: IO[bytes] = open(self.tmp, "wb")
        self._h = blake3.blake3()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._h.update(chunk)
        self._f.write(chunk)
        self.size += len(chunk)

    def close(self) -> str:
        """Close the file; the hex digest."""
        self._f.close()
        return str(self._h.hexdigest())

    def discard(self) -> None:
        self._f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class AssetStore:
    def __init__(self, log_root: Path) -> None:
        self.root = Path(log_root) / "@v2" / "assets"
        self.blobs = self.root / "blobs"
        self.records = self.root / "records"
        self.owners = self.root / "owners"
        #: ``refs/<h>/<asset id>``: the assets over each blob (the last one
        #: deleted takes the blob with it).
        self.refs = self.root / "refs"

    # ----------------------------------------------------------- blobs
    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest[:2] / digest

    def keep_blob(self, hasher: Hasher, digest: str) -> bool:
        """Move an upload into place; False when the blob was there already
        (a dedup hit: the upload is dropped)."""
        target = self.blob_path(digest)
        if target.exists():
            hasher.discard()
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(hasher.tmp, target)
        return True

    def may_mint(self, owner: str, digest: str) -> bool:
        """Whether ``owner`` uploaded these bytes (and they are still here)."""
        return (self.owners / _safe(owner) / digest).exists() and self.blob_path(digest).exists()

    # --------------------------------------------------------- records
    def mint(self, owner: str, digest: str, size: int, content_type: str,
             file_path: str | None, tags: list[str]) -> AssetRecord:
        """A new asset record over the blob ``digest``; ``owner`` may mint from it since."""
        record = AssetRecord(f"asset_{uuid.uuid4().hex}", f"blake3:{digest}", size, content_type,
                             file_path, owner, time.time(), tags)
        mark = self.owners / _safe(owner)
        mark.mkdir(parents=True, exist_ok=True)
        (mark / digest).touch()
        # The reference first: a blob with a reference is never deleted.
        refs = self.refs / digest
        refs.mkdir(parents=True, exist_ok=True)
        (refs / record.id).touch()
        if not self.blob_path(digest).exists():  # its last asset was deleted meanwhile
            os.unlink(refs / record.id)
            raise FileNotFoundError(f"blob {digest} is gone")
        self.records.mkdir(parents=True, exist_ok=True)
        tmp = self.records / f".{record.id}.tmp"
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, self.records / record.id)
        return record

    def get(self, asset_id: str) -> AssetRecord | None:
        if not _ID_RE.fullmatch(asset_id):
            return None
        try:
            raw = (self.records / asset_id).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        d = json.loads(raw)
        return AssetRecord(**d)

    def delete(self, asset_id: str) -> bool:
        """Remove the record; the bytes too when no other asset is over them
        (copies already given to a job's inputs are links of their own)."""
        record = self.get(asset_id)
        if record is None:
            return False
        try:
            os.unlink(self.records / asset_id)
        except FileNotFoundError:
            return False
        refs = self.refs / record.digest
        try:
            os.unlink(refs / asset_id)
            os.rmdir(refs)  # fails while another asset refers to the blob
        except (FileNotFoundError, OSError):
            return True
        try:
            os.unlink(self.blob_path(record.digest))
        except FileNotFoundError:
            pass
        return True


def _safe(owner: str) -> str:
    """An owner (a key hash or "anonymous") as a folder name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", owner)[:128] or "_"
