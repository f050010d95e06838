"""IdempotencyStore on real files: the states a key goes through, expiry,
and a pending record whose instance died."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_embed.service.idempotency import IdempotencyStore, body_hash


def test_key_lifecycle(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path, hours=24, stale_seconds=60)
    fp = body_hash(b'{"workflow": 1}')
    assert store.begin("owner", "k", fp, now=1000).kind == "new"
    assert store.begin("owner", "k", fp, now=1001).kind == "in_flight"
    assert store.begin("owner", "k", body_hash(b"other"), now=1001).kind == "reuse"
    assert store.begin("someone else", "k", fp, now=1001).kind == "new"  # keys are per owner
    store.finish("owner", "k", fp, 201, b'{"id": "job_1"}', {"Location": "/x"})
    replay = store.begin("owner", "k", fp, now=1002)
    assert (replay.kind, replay.status, replay.body) == ("replay", 201, b'{"id": "job_1"}')
    assert replay.headers == {"Location": "/x"}
    # The key itself is never written: files are named by a hash.
    assert all("k" != p.name and b"owner" not in p.read_bytes()
               for p in (tmp_path / "@v2" / "idempotency").iterdir())


def test_expired_and_stale_records_are_replaced(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path, hours=1, stale_seconds=60)
    fp = body_hash(b"a")
    assert store.begin("o", "done", fp, now=0).kind == "new"
    store.finish("o", "done", fp, 201, b"{}", {})
    # finish() stamps the real time; an hour and more later it is forgotten.
    record_time = (tmp_path / "@v2" / "idempotency").stat().st_mtime
    assert store.begin("o", "done", body_hash(b"b"), now=record_time + 3601 + 60).kind == "new"
    assert store.begin("o", "pending", fp, now=100).kind == "new"
    assert store.begin("o", "pending", fp, now=130).kind == "in_flight"
    assert store.begin("o", "pending", fp, now=161).kind == "new"  # its instance died


def test_abandon_frees_the_key(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path, hours=24, stale_seconds=60)
    assert store.begin("o", "k", body_hash(b"bad"), now=0).kind == "new"
    store.abandon("o", "k")
    assert store.begin("o", "k", body_hash(b"good"), now=1).kind == "new"


def test_prune_deletes_only_records_past_their_lifetime(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path, hours=1, stale_seconds=60)
    store.begin("o", "old", body_hash(b"1"))
    store.begin("o", "new", body_hash(b"2"))
    old = store._path("o", "old")
    os.utime(old, (0, 0))  # written long ago
    assert store.prune() == 1
    assert not old.exists() and store._path("o", "new").exists()
    assert IdempotencyStore(tmp_path / "none", hours=1, stale_seconds=1).prune() == 0
