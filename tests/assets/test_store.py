"""AssetStore on real files: blobs written once, records, per-owner marks."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest

from comfy_embed.assets.store import AssetStore, Hasher, parse_hash


def put(store: AssetStore, data: bytes) -> tuple[str, bool]:
    h = Hasher(store)
    h.write(data[:3])
    h.write(data[3:])
    digest = h.close()
    return digest, store.keep_blob(h, digest)


def test_blob_once_records_and_owners(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    digest, new = put(store, b"hello world")
    assert digest == blake3.blake3(b"hello world").hexdigest() and new
    assert put(store, b"hello world") == (digest, False)
    # One blob; no temporary file left by either upload.
    assert [p.name for p in store.blobs.rglob("*") if p.is_file()] == [digest]
    record = store.mint("alice", digest, 11, "text/plain", "hi.txt", ["input"])
    assert store.get(record.id) == record and record.hash == f"blake3:{digest}"
    assert store.may_mint("alice", digest) and not store.may_mint("bob", digest)
    assert store.delete(record.id) and store.get(record.id) is None
    assert not store.delete(record.id)
    assert store.get("../../etc/passwd") is None and store.get("asset_xyz") is None


def test_discarded_upload_leaves_nothing(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    h = Hasher(store)
    h.write(b"partial")
    h.close()
    h.discard()
    assert [p for p in store.blobs.rglob("*") if p.is_file()] == []


def test_parse_hash() -> None:
    hexa = "a" * 64
    assert parse_hash(f"blake3:{hexa}") == hexa
    assert parse_hash(f"BLAKE3:{hexa.upper()}") == hexa
    assert parse_hash("blake3:abc") is None and parse_hash(f"sha256:{hexa}") is None


def test_the_last_asset_deleted_takes_the_bytes(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    digest, _ = put(store, b"shared bytes")
    one = store.mint("alice", digest, 12, "text/plain", None, [])
    two = store.mint("bob", digest, 12, "text/plain", None, [])
    assert store.delete(one.id)
    assert store.blob_path(digest).is_file() and store.may_mint("bob", digest)
    assert store.delete(two.id)
    assert not store.blob_path(digest).exists()
    assert not store.may_mint("alice", digest) and not store.may_mint("bob", digest)
    with pytest.raises(FileNotFoundError):
        store.mint("alice", digest, 12, "text/plain", None, [])
    assert list(store.records.iterdir()) == []  # no record without its bytes
