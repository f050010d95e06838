"""Tests for comfy_embed.tasklog.reader: what a reader sees while others
write, what it skips, and logs of earlier versions. Real files under tmp_path."""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.events import FINAL
from comfy_embed.tasklog import reader
from comfy_embed.tasklog.log import TaskLog

from tests.tasklog.test_log import TIMEOUT, FakeClock, assert_consistent, ev, final


# --- while writers write ----------------------------------------------------


def test_polling_reader_never_sees_partial_event(tmp_path: Path) -> None:
    writer, reader = TaskLog(tmp_path, "w"), TaskLog(tmp_path, "r")
    writer.claim("t")
    blob = "x" * 200_000  # large enough that a plain write would be seen half done
    count = 60
    failures: list[BaseException] = []

    def write() -> None:
        try:
            for n in range(count):
                writer.append("t", ev(n, blob=blob))
            writer.append("t", final())
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    seen: list[tuple[int, dict[str, Any]]] = []
    polls = 0
    while not seen or seen[-1][1]["type"] != FINAL:
        assert not failures, failures
        polls += 1
        assert polls < 10_000_000, "writer never finished"
        batch = reader.read("t", since=seen[-1][0] if seen else 0)
        for seq, event in batch:
            if event["type"] != FINAL:
                assert event["data"]["blob"] == blob
                assert event["data"]["value"] == seq - 1
        seen.extend(batch)
    thread.join(TIMEOUT)
    assert_consistent(seen, count + 1)


@pytest.mark.usefixtures("no_hardlinks")
def test_fallback_hole_from_crashed_writer(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1", lease_seconds=30)
    tl.claim("t")
    tl.append("t", ev(0))
    # A writer reserved seq 2 (the lock names the last seq of its range) and
    # has not published it yet; seq 3 is out.
    lock = tmp_path / "t" / ".00000002.json.lock"
    lock.write_text("2")
    assert TaskLog(tmp_path, "i2").append("t", ev(2)) == 3
    assert [s for s, _ in tl.read("t")] == [1]  # wait for 2, don't skip it
    # The reserving writer died long ago: the hole is skipped.
    os.utime(lock, (1.0, 1.0))
    assert [s for s, _ in tl.read("t")] == [1, 3]


def test_final_without_marker_stays_hidden_until_recovered(tmp_path: Path) -> None:
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    tl.claim("t")
    tl.append("t", ev(0))
    # The owner died between publishing its final event and the marker.
    (tmp_path / "t" / "00000002.json").write_text('{"type": "serverless_api", "data": {}}')
    assert [s for s, _ in tl.read("t")] == [1]
    assert not tl.is_final("t")
    assert tl.recover_orphans(now=clock.t + 31) == ["t"]
    events = tl.read("t")
    assert [s for s, _ in events] == [1, 3]
    assert events[-1][1]["data"]["error"]["type"] == "task_lost"


def test_final_events_supersede_the_chain_from_their_first_seq(tmp_path: Path) -> None:
    """Whatever segment lies from the owner's ``from`` on (here a stray
    non-owner event the owner did not see) is not read beside the final's
    own events: no seq twice."""
    owner = TaskLog(tmp_path, "owner")
    owner.claim("t")
    owner.extend("t", [(1, ev(1))])
    assert TaskLog(tmp_path, "stray").append("t", ev(99)) == 2
    assert owner.extend("t", [(2, ev(2)), (3, final())]) == 3
    assert TaskLog(tmp_path, "r").read("t") == [(1, ev(1)), (2, ev(2)), (3, final())]


def test_read_since_skips_older_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    for n in range(50):
        tl.extend("t", [(2 * n + 1, ev(2 * n + 1)), (2 * n + 2, ev(2 * n + 2))])
    opened: list[str] = []
    real = reader.load

    def spy(path: Path) -> Any:
        opened.append(path.name)
        return real(path)

    monkeypatch.setattr(reader, "load", spy)
    assert [s for s, _ in tl.read("t", since=96)] == [97, 98, 99, 100]
    assert opened == ["00000097.json", "00000099.json"]


def test_final_survives_lost_segment(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    tl.append("t", ev(0))
    # Another instance (not the owner) reserves the final's seq with a
    # placeholder segment.
    TaskLog(tmp_path, "i2").append("t", final())
    assert sorted(os.listdir(tmp_path / "t")) == ["00000001.json", "00000002.json",
                                                  "final", "owner.json"]
    # Segments are not fsynced: a crash of the machine may lose one.
    (tmp_path / "t" / "00000002.json").unlink()
    assert [(s, e["type"]) for s, e in tl.read("t")] == [(1, "progress"), (2, FINAL)]


# --- earlier versions' logs -------------------------------------------------


def test_reads_logs_of_the_earlier_format(tmp_path: Path) -> None:
    import json
    d = tmp_path / "old"
    d.mkdir()
    (d / "owner.json").write_text(json.dumps({"instance_id": "old"}))
    (d / "00000001.json").write_text(json.dumps(ev(1)))
    (d / "00000002.json").write_text(json.dumps(final()))
    (d / "final").write_text("2")
    tl = TaskLog(tmp_path, "new")
    assert tl.read("old") == [(1, ev(1)), (2, final())]
    assert tl.is_final("old") and tl.append("old", ev(3)) == 2


def test_reads_the_previous_uncompressed_format(tmp_path: Path) -> None:
    """The version before: plain JSON, a placeholder segment, ``final`` with
    the event and a sidecar blob."""
    d = tmp_path / "t"
    d.mkdir()
    png = os.urandom(300)
    stripped = {"type": FINAL, "data": {"status": "success", "results": [
        {"node_id": "9", "index": 0, "output": {"comfy": {"filename": "x.png"},
                                                "base64": {"blob": [0, 300]}}}]}}
    (d / "owner.json").write_text(json.dumps({"instance_id": "old"}))
    (d / "00000001.json").write_text(json.dumps([[1, ev(1)], [3, {"type": FINAL}]]))
    (d / "final.abc.blob").write_bytes(png)
    (d / "final").write_text(json.dumps({"seq": 3, "event": stripped, "blob": "final.abc.blob"}))
    tl = TaskLog(tmp_path, "new")
    (s1, e1), (s3, e3) = tl.read("t")
    assert (s1, e1, s3) == (1, ev(1), 3)
    assert e3["data"]["results"][0]["output"]["base64"] == {
        "data": base64.b64encode(png).decode()}
    assert tl.read("t", since=1) == [(3, e3)]
    assert tl.is_final("t") and tl.append("t", final("error")) == 3
