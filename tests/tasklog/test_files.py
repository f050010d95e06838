"""Tests for comfy_embed.tasklog.files: names, encoding and publishing of
the task log's files. Real files under tmp_path."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest

from comfy_embed.tasklog import files
from comfy_embed.tasklog.log import TaskLog

from tests.tasklog.test_log import ev, final


def test_files_are_compressed_json(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    tl.extend("t", [(1, ev(1, note="abc" * 100)), (2, ev(2, note="abc" * 100))])
    tl.extend("t", [(3, ev(3)), (4, final())])
    d = tmp_path / "t"
    for name in ("00000001.json", "final"):
        raw = (d / name).read_bytes()
        assert raw[:1] == b"x"
        json.loads(zlib.decompress(raw))  # zlib-compressed JSON, nothing else
    assert (d / "00000001.json").stat().st_size < 200  # 600 bytes of notes, squeezed
    assert tl.read("t") == [(1, ev(1, note="abc" * 100)), (2, ev(2, note="abc" * 100)),
                            (3, ev(3)), (4, final())]


def test_publish_is_exclusive_and_leaves_no_temp_file(tmp_path: Path) -> None:
    assert files.publish(tmp_path, "a", b"first")
    assert not files.publish(tmp_path, "a", b"second")
    assert (tmp_path / "a").read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["a"]


@pytest.mark.usefixtures("no_hardlinks")
def test_publish_without_hardlinks_reserves_the_name(tmp_path: Path) -> None:
    """The fallback: an exclusive hidden lock holding the reservation, then a rename."""
    assert files.publish(tmp_path, files.segment_name(3), b"seg", reservation=b"5")
    assert not files.publish(tmp_path, files.segment_name(3), b"other")
    assert (tmp_path / "00000003.json").read_bytes() == b"seg"
    assert (tmp_path / files.lock_name(3)).read_bytes() == b"5"
    assert files.LOCK_RE.fullmatch(files.lock_name(3))


def test_durable_publish_fsyncs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    files.publish(tmp_path, "plain", b"x")
    assert synced == []
    files.publish(tmp_path, "durable", b"x", durable=True)
    assert len(synced) == 1


def test_segment_names_and_log_files() -> None:
    names = ["00000010.json", "00000002.json", "owner.json", ".00000011.json.lock", "final"]
    assert files.segment_seqs(names) == [2, 10]
    for own in ("owner.json", "final", "final.abc.blob", "cancel", "owner_key", "00000001.json"):
        assert files.is_log_file(own), own
    for record in ("webhook.json", "webhook.lease.0001", "finals", "cancelled"):
        assert not files.is_log_file(record), record


def test_decode_reads_compressed_and_plain_json(tmp_path: Path) -> None:
    value = [[1, {"type": "progress", "data": {}}]]
    assert files.decode(files.encode(value)) == value
    assert files.decode(json.dumps(value).encode()) == value  # an earlier version's file
    with pytest.raises(ValueError):
        files.decode(b"x not zlib")
    (tmp_path / "bad").write_bytes(b"{half")
    assert files.load(tmp_path / "bad") is None  # logged, skipped
    assert files.load(tmp_path / "missing") is None
    assert files.parse(None, "nowhere") is None


def test_event_pairs_of_every_version() -> None:
    assert files.event_pairs([[1, {"a": 1}], [3, {"b": 2}]], 1) == [(1, {"a": 1}), (3, {"b": 2})]
    assert files.event_pairs({"a": 1}, 7) == [(7, {"a": 1})]  # one event per file
    assert files.event_pairs([[1], ["x", {}], [2, "no"], 5], 1) == []
    assert files.event_pairs(None, 1) == []


def test_read_final_of_every_version(tmp_path: Path) -> None:
    assert files.read_final(tmp_path) is None
    (tmp_path / "final").write_text("4\n")  # an earlier version: only the seq
    assert files.read_final(tmp_path) == files.FinalMarker(4, None, None)
    marker = {"seq": 5, "event": final(), "blob": None, "from": 3, "events": [[3, ev(3)]]}
    (tmp_path / "final").write_bytes(files.encode(marker))
    assert files.read_final(tmp_path) == files.FinalMarker(5, final(), None, 3, ((3, ev(3)),))
    (tmp_path / "final").write_bytes(b"{}")
    assert files.read_final(tmp_path) is None  # undecodable: logged
