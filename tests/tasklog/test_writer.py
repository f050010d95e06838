"""Tests for comfy_embed.tasklog.writer: exactly one final event whoever
writes it, concurrent writers (threads, processes, no hard links), batches
and the final file. Real files under tmp_path."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.events import FINAL
from comfy_embed.tasklog import files
from comfy_embed.tasklog import log as log_module
from comfy_embed.tasklog import reader as reader_module
from comfy_embed.tasklog import writer as writer_module
from comfy_embed.tasklog.log import TaskLog

from tests.tasklog.test_log import (TIMEOUT, FakeClock, assert_consistent, base64_final, ev,
                                    final, run_threads)


# --- exactly one final ------------------------------------------------------


def test_exactly_one_final(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    tl.append("t", ev(0))
    assert tl.append("t", final("success")) == 2
    assert tl.is_final("t")
    # A second final, or anything after the final, is refused.
    assert tl.append("t", final("error")) == 2
    assert tl.append("t", ev(1)) == 2
    other = TaskLog(tmp_path, "i2")
    assert other.append("t", final("error")) == 2
    events = tl.read("t")
    assert [e["type"] for _, e in events] == ["progress", FINAL]
    assert events[-1][1]["data"]["status"] == "success"
    # The owner's final file needs no placeholder segment.
    assert sorted(os.listdir(tmp_path / "t")) == ["00000001.json", "final", "owner.json"]


@pytest.mark.parametrize("hardlinks", [True, False])
def test_racing_finals_one_counts(tmp_path: Path, hardlinks: bool,
                                  request: pytest.FixtureRequest) -> None:
    if not hardlinks:
        request.getfixturevalue("no_hardlinks")
    logs = [TaskLog(tmp_path, f"i{i}") for i in range(6)]
    logs[0].claim("t")
    seqs = run_threads(6, lambda i: logs[i].append("t", final(f"by{i}")))
    events = logs[0].read("t")
    assert len(events) == 1 and events[0][1]["type"] == FINAL
    # Every caller is told the seq of the one final that counts.
    assert set(seqs) == {events[0][0]}
    assert logs[1].is_final("t")


def test_owner_final_wins_over_a_rescuers_placeholder(tmp_path: Path) -> None:
    """A rescuer published its placeholder at the seq the owner (stale view)
    also starts its final at; the owner's final wins the name."""
    owner = TaskLog(tmp_path, "owner")
    owner.claim("t")
    owner.extend("t", [(1, ev(1))])
    d = tmp_path / "t"
    assert files.publish(d, "00000002.json", files.encode([[2, {"type": FINAL}]]))
    reader = TaskLog(tmp_path, "r")
    assert [s for s, _ in reader.read("t")] == [1]  # stops before the placeholder
    assert owner.extend("t", [(2, ev(2)), (3, final())]) == 3
    assert reader.read("t", since=1) == [(2, ev(2)), (3, final())]
    assert reader.read("t") == [(1, ev(1)), (2, ev(2)), (3, final())]
    assert TaskLog(tmp_path, "late").append("t", final("error")) == 3


def test_rescuer_final_wins_over_owner(tmp_path: Path) -> None:
    owner = TaskLog(tmp_path, "owner")
    owner.claim("t")
    owner.extend("t", [(1, ev(1))])
    assert TaskLog(tmp_path, "rescuer").append("t", final("error")) == 2
    # The owner's last flush comes too late: not a second final.
    assert owner.extend("t", [(2, ev(2)), (3, final())]) == 2
    events = TaskLog(tmp_path, "r").read("t")
    assert [s for s, _ in events] == [1, 2] and events[-1][1]["data"]["status"] == "error"


@pytest.mark.parametrize("hardlinks", [True, False])
def test_owner_and_rescuers_race_one_final(tmp_path: Path, hardlinks: bool,
                                           request: pytest.FixtureRequest) -> None:
    if not hardlinks:
        request.getfixturevalue("no_hardlinks")
    for round_ in range(10):
        task = f"t{round_}"
        owner = TaskLog(tmp_path, "owner")
        owner.claim(task)
        owner.extend(task, [(1, ev(1))])
        rescuers = [TaskLog(tmp_path, f"r{i}") for i in range(3)]

        def finish(i: int) -> int:
            if i == 0:
                return owner.extend(task, [(2, ev(2)), (3, ev(3)), (4, final("owner"))])
            return rescuers[i - 1].append(task, final(f"r{i}"))

        seqs = run_threads(4, finish)
        events = TaskLog(tmp_path, "reader").read(task)
        finals = [(s, e) for s, e in events if e["type"] == FINAL]
        assert len(finals) == 1 and events[-1] == finals[0]
        assert set(seqs) == {finals[0][0]}  # everyone is told the one that counts
        got = [s for s, _ in events]
        assert got == sorted(set(got)) and got[0] == 1
        if finals[0][1]["data"]["status"] == "owner":
            assert got == [1, 2, 3, 4]


def test_owner_final_lands_in_a_folder_deleted_under_it(tmp_path: Path) -> None:
    import shutil

    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=FakeClock())
    tl.claim("t")
    tl.append("t", ev(0))
    shutil.rmtree(tmp_path / "t")
    assert tl.extend("t", [(None, final())]) >= 1
    assert tl.is_final("t") and tl.read("t")[-1][1]["type"] == FINAL


def test_owner_final_loses_to_a_final_already_there(tmp_path: Path) -> None:
    """The owner writes its final without looking first: one already there
    (a recovery that took it for dead) still wins, and nothing is doubled."""
    clock = FakeClock()
    owner = TaskLog(tmp_path, "owner", lease_seconds=30, clock=clock)
    rescuer = TaskLog(tmp_path, "rescuer", lease_seconds=30, clock=clock)
    owner.claim("t")
    owner.append("t", ev(0))
    assert rescuer.recover_orphans(now=clock.t + 31) == ["t"]
    seq = owner.extend("t", [(None, ev(1)), (None, final())])
    events = owner.read("t")
    assert seq == events[-1][0] and [e["type"] for _, e in events] == ["progress", FINAL]
    assert events[-1][1]["data"]["error"]["type"] == "task_lost"


# --- concurrency ------------------------------------------------------------


def test_concurrent_thread_appends(tmp_path: Path) -> None:
    shared = TaskLog(tmp_path, "shared")
    shared.claim("t")
    # Half the threads share one TaskLog, half have their own (no seq hint).
    logs = [shared if i % 2 else TaskLog(tmp_path, f"i{i}") for i in range(8)]

    def write(i: int) -> list[int]:
        return [logs[i].append("t", ev(n, writer=i)) for n in range(40)]

    seqs = run_threads(8, write)
    assert sorted(s for part in seqs for s in part) == list(range(1, 321))
    events = shared.read("t")
    assert_consistent(events, 320)
    got = sorted((e["data"]["writer"], e["data"]["value"]) for _, e in events)
    assert got == sorted((i, n) for i in range(8) for n in range(40))


_WRITER = """
import sys, time
from pathlib import Path
from comfy_embed.tasklog.log import TaskLog
root, name, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
tl = TaskLog(Path(root), name)
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.001)
for n in range(count):
    tl.append("t", {"type": "progress", "data": {"value": n, "writer": name}})
"""


def test_concurrent_process_appends(tmp_path: Path) -> None:
    import subprocess
    import sys

    TaskLog(tmp_path, "lead").claim("t")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"p{i}", "150", str(go)])
             for i in range(2)]
    go.write_text("")  # both start appending at about the same moment
    for p in procs:
        assert p.wait(TIMEOUT) == 0
    events = TaskLog(tmp_path, "reader").read("t")
    assert_consistent(events, 300)
    got = sorted((e["data"]["writer"], e["data"]["value"]) for _, e in events)
    assert got == sorted((f"p{i}", n) for i in range(2) for n in range(150))


@pytest.mark.usefixtures("no_hardlinks")
def test_fallback_without_hardlinks(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    assert tl.claim("t") and not TaskLog(tmp_path, "i2").claim("t")
    logs = [TaskLog(tmp_path, f"i{i}") for i in range(6)]
    run_threads(6, lambda i: [logs[i].append("t", ev(n, writer=i)) for n in range(20)])
    assert logs[0].append("t", final()) == 121
    assert logs[1].append("t", final("error")) == 121
    events = tl.read("t")
    assert_consistent(events, 121)
    assert events[-1][1]["data"]["status"] == "success"
    assert tl.owner("t") == "i1"


@pytest.mark.usefixtures("no_hardlinks")
def test_fallback_batches_do_not_overlap(tmp_path: Path) -> None:
    logs = [TaskLog(tmp_path, f"i{i}") for i in range(4)]
    logs[0].claim("t")

    def write(i: int) -> None:
        for n in range(15):
            logs[i].extend("t", [(None, ev(n, writer=i)), (None, ev(n, writer=i, second=True))])

    run_threads(4, write)
    events = logs[0].read("t")
    assert_consistent(events, 120)
    assert sorted((e["data"]["writer"], e["data"]["value"], "second" in e["data"])
                  for _, e in events) == sorted((i, n, s) for i in range(4) for n in range(15)
                                                for s in (False, True))


# --- batches and the final file ---------------------------------------------


def test_extend_writes_one_file_per_batch_with_caller_seqs(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    # The caller's seqs may skip numbers (superseded progress is not stored).
    assert tl.extend("t", [(1, ev(1)), (2, ev(2)), (5, ev(5))]) == 5
    assert tl.extend("t", [(6, ev(6)), (9, ev(9))]) == 9
    assert sorted(n for n in os.listdir(tmp_path / "t") if n.endswith(".json")) == [
        "00000001.json", "00000006.json", "owner.json"]
    assert [(s, e["data"]["value"]) for s, e in tl.read("t")] == [
        (1, 1), (2, 2), (5, 5), (6, 6), (9, 9)]
    assert [s for s, _ in tl.read("t", since=5)] == [6, 9]
    assert [s for s, _ in tl.read("t", since=7)] == [9]
    # Another instance (no cached seq) continues the chain after 9.
    assert TaskLog(tmp_path, "i2").append("t", ev(10)) == 10
    # The first writer's cached end is stale: its seqs that were taken are dropped.
    assert tl.extend("t", [(10, ev(99)), (11, ev(11))]) == 11
    assert [(s, e["data"]["value"]) for s, e in tl.read("t", since=9)] == [(10, 10), (11, 11)]


def test_short_task_is_two_files(tmp_path: Path) -> None:
    """A task that ends before its first flush: owner file and final file."""
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    assert tl.extend("t", [(1, ev(1)), (2, ev(2)), (4, ev(4)), (5, final())]) == 5
    assert sorted(os.listdir(tmp_path / "t")) == ["final", "owner.json"]
    other = TaskLog(tmp_path, "i2")
    assert other.read("t") == [(1, ev(1)), (2, ev(2)), (4, ev(4)), (5, final())]
    assert other.read("t", since=2) == [(4, ev(4)), (5, final())]
    assert other.read("t", since=4) == [(5, final())]
    assert other.read("t", since=5) == []
    # Nothing counts after it, from anyone.
    assert tl.append("t", ev(6)) == 5 and other.append("t", final("error")) == 5
    assert [s for s, _ in other.read("t")] == [1, 2, 4, 5]


def test_owner_final_after_segments(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    tl.extend("t", [(1, ev(1)), (2, ev(2))])
    reader = TaskLog(tmp_path, "r")
    assert [s for s, _ in reader.read("t")] == [1, 2]
    tl.extend("t", [(3, ev(3)), (7, final())])
    assert sorted(os.listdir(tmp_path / "t")) == ["00000001.json", "final", "owner.json"]
    assert reader.read("t", since=2) == [(3, ev(3)), (7, final())]
    assert [s for s, _ in reader.read("t")] == [1, 2, 3, 7]


def test_large_last_flush_keeps_a_segment(tmp_path: Path) -> None:
    """The fsynced final file stays small: a big last flush is a segment."""
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    noise = [base64.b64encode(os.urandom(30_000)).decode() for _ in range(4)]
    batch: list[tuple[int | None, dict[str, Any]]] = [(n + 1, ev(n + 1, noise=x))
                                                      for n, x in enumerate(noise)]
    assert tl.extend("t", [*batch, (5, final())]) == 5
    assert sorted(os.listdir(tmp_path / "t")) == ["00000001.json", "final", "owner.json"]
    assert (tmp_path / "t" / "final").stat().st_size < 1000
    assert TaskLog(tmp_path, "r").read("t") == [*batch, (5, final())]


def test_only_the_final_file_is_fsynced_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    tl.extend("t", [(1, ev(1)), (2, ev(2))])
    assert synced == []  # progress: no fsync
    tl.extend("t", [(3, ev(3)), (4, base64_final("t", [b"png bytes"]))])
    assert len(synced) == 1  # the final file, once (its directory entry with it)
    assert tl.read("t")[-1][1]["data"]["results"][0]["output"]["base64"]["data"]


def test_the_owner_writes_a_new_task_without_listing_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claimed folder is new, so the owner knows its chain is empty: the
    write on each answer's path lists no folder. Another instance, which
    does not own the task (recovery closing it), still lists it to find
    where the chain ends."""
    listed: list[Path] = []
    real = files.listdir
    for module in (log_module, writer_module, reader_module):  # every module of the log that lists folders
        monkeypatch.setattr(module, "listdir", lambda d: listed.append(d) or real(d))
    owner, other = TaskLog(tmp_path, "i1"), TaskLog(tmp_path, "i2")
    owner.claim("t")
    owner.extend("t", [(1, ev(1)), (2, final())])
    assert listed == []
    assert [seq for seq, _ in owner.read("t")] == [1, 2]
    owner.claim("u")
    owner.extend("u", [(1, ev(1))])
    listed.clear()
    assert other.append("u", final("failed")) == 2  # recovery's way: it must look first
    assert listed == [tmp_path / "u"]
    assert [(seq, e["type"]) for seq, e in owner.read("u")] == [(1, "progress"), (2, FINAL)]
