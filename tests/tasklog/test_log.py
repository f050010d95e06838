"""Tests for comfy_embed.tasklog.log on real files (tmp_path), threads and processes."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.tasklog import log as tasklog
from comfy_embed.tasklog.log import FINAL_TYPE, TaskLog

TIMEOUT = 60.0


class FakeClock:
    """A settable wall clock, so lease expiry needs no sleeping."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ev(n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "progress", "data": {"value": n, **extra}}


def final(status: str = "success") -> dict[str, Any]:
    return {"type": FINAL_TYPE, "data": {"status": status, "results": []}}


def run_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads released together; return their results."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    if errors:
        raise errors[0]
    return results


def assert_consistent(events: list[tuple[int, dict[str, Any]]], count: int) -> None:
    assert [s for s, _ in events] == list(range(1, count + 1))


# --- basics ---------------------------------------------------------------


def test_valid_task_id() -> None:
    assert TaskLog.valid_task_id("abc-DEF_1.2")
    assert TaskLog.valid_task_id("x" * 128)
    for bad in ("", ".", "..", "a/b", "../x", "a b", "x" * 129, "é"):
        assert not TaskLog.valid_task_id(bad)


def test_invalid_task_id_rejected(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    with pytest.raises(ValueError):
        tl.append("../escape", ev(1))
    with pytest.raises(ValueError):
        tl.read("..")


def test_append_read_order_and_since(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    assert tl.claim("t1")
    assert [tl.append("t1", ev(i)) for i in range(5)] == [1, 2, 3, 4, 5]
    events = tl.read("t1")
    assert [(s, e["data"]["value"]) for s, e in events] == [(i + 1, i) for i in range(5)]
    assert [s for s, _ in tl.read("t1", since=3)] == [4, 5]
    assert tl.read("t1", since=5) == []
    assert not tl.is_final("t1")
    # Temp files a writer left behind are never read as events.
    (tmp_path / "t1" / ".tmp-leftover").write_text("{half")
    assert len(tl.read("t1")) == 5


def test_unknown_task(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path / "missing-root", "i1")
    assert tl.read("nope") == []
    assert not tl.exists("nope")
    assert not tl.is_final("nope")
    assert tl.owner("nope") is None
    assert not tl.request_cancel("nope")
    assert not tl.cancel_requested("nope")
    assert tl.recover_orphans() == []


def test_claim_is_exclusive(tmp_path: Path) -> None:
    a, b = TaskLog(tmp_path, "a"), TaskLog(tmp_path, "b")
    assert a.claim("t") is True
    assert b.claim("t") is False
    assert a.exists("t") and b.exists("t")
    assert b.owner("t") == "a"


def test_concurrent_claims_one_wins(tmp_path: Path) -> None:
    logs = [TaskLog(tmp_path, f"i{i}") for i in range(8)]
    won = run_threads(8, lambda i: logs[i].claim("t"))
    assert sorted(won) == [False] * 7 + [True]
    assert logs[0].owner("t") == f"i{won.index(True)}"


# --- the final event ---------------------------------------------------------


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
    assert [e["type"] for _, e in events] == ["progress", FINAL_TYPE]
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
    assert len(events) == 1 and events[0][1]["type"] == FINAL_TYPE
    # Every caller is told the seq of the one final that counts.
    assert set(seqs) == {events[0][0]}
    assert logs[1].is_final("t")


# --- concurrency -------------------------------------------------------------


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


# A separate interpreter, not multiprocessing: spawn would copy this process's
# sys.path, where ComfyUI (booted by other tests) has put its own `tests`
# package ahead of ours.
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
    while not seen or seen[-1][1]["type"] != FINAL_TYPE:
        assert not failures, failures
        polls += 1
        assert polls < 10_000_000, "writer never finished"
        batch = reader.read("t", since=seen[-1][0] if seen else 0)
        for seq, event in batch:
            if event["type"] != FINAL_TYPE:
                assert event["data"]["blob"] == blob
                assert event["data"]["value"] == seq - 1
        seen.extend(batch)
    thread.join(TIMEOUT)
    assert_consistent(seen, count + 1)


# --- filesystems without hard links (ossfs) ----------------------------------


@pytest.fixture
def no_hardlinks(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(tasklog.os, "link", refuse)


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


# --- cancel, leases, recovery ------------------------------------------------


def test_cancel_visible_to_other_instance(tmp_path: Path) -> None:
    owner, other = TaskLog(tmp_path, "owner"), TaskLog(tmp_path, "other")
    owner.claim("t")
    assert not owner.cancel_requested("t")
    assert other.request_cancel("t") is True
    assert other.request_cancel("t") is True  # idempotent
    assert owner.cancel_requested("t")
    owner.claim("done")
    owner.append("done", final())
    assert other.request_cancel("done") is False
    assert not owner.cancel_requested("done")


def test_recover_orphans(tmp_path: Path) -> None:
    clock = FakeClock()
    owner = TaskLog(tmp_path, "owner", lease_seconds=30, clock=clock)
    rescuer = TaskLog(tmp_path, "rescuer", lease_seconds=30, clock=clock)
    for task in ("dead", "live", "finished"):
        owner.claim(task)
        owner.append(task, ev(0))
    owner.append("finished", final())
    clock.t += 20
    owner.renew(["live"])  # "dead" is no longer renewed: its owner crashed
    assert rescuer.recover_orphans(now=clock.t + 5) == []  # 25 s: not yet expired
    assert rescuer.recover_orphans(now=clock.t + 15) == ["dead"]
    events = rescuer.read("dead")
    assert [e["type"] for _, e in events] == ["progress", FINAL_TYPE]
    data = events[-1][1]["data"]
    assert data["status"] == "error" and data["task_id"] == "dead"
    assert data["prompt_id"] is None and data["seeds"] == {} and data["results"] == []
    assert data["error"]["type"] == "task_lost" and data["error"]["node_errors"] == {}
    assert data["error"]["message"].startswith(
        "the instance running this task stopped (lease expired)")
    assert not rescuer.is_final("live")
    # Running again changes nothing; the late owner's final is refused.
    assert rescuer.recover_orphans(now=clock.t + 15) == []
    assert owner.append("dead", final()) == 2
    assert len(rescuer.read("dead")) == 2


def test_release_without_final_is_recovered(tmp_path: Path) -> None:
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    tl.claim("gave-up")
    tl.claim("done")
    tl.append("done", final())
    tl.release("done")
    tl.release("gave-up")
    assert tl.recover_orphans(now=clock.t) == ["gave-up"]
    assert tl.is_final("gave-up")
    # Released, not expired: the message says so (no age since the epoch).
    message = tl.read("gave-up")[-1][1]["data"]["error"]["message"]
    assert "(i1) released it without a final event" in message, message


def test_release_after_own_final_leaves_the_lease(tmp_path: Path) -> None:
    """A task released after its final event needs no expired lease (a
    write saved on every answer's path); one without a final still gets it,
    and the wall-clock claim's lease is the owner file's creation time."""
    import time

    tl = TaskLog(tmp_path, "i1", lease_seconds=30)  # the real clock
    before = time.time()
    tl.claim("done")
    tl.claim("gave-up")
    lease = os.stat(tmp_path / "done" / "owner.json").st_mtime
    assert before - 1 <= lease <= time.time() + 1
    assert tl.owns("done")
    tl.append("done", final())
    tl.release("done", final=True)
    tl.release("gave-up")
    assert not tl.owns("done") and not tl.owns("gave-up")
    assert os.stat(tmp_path / "done" / "owner.json").st_mtime == lease
    assert os.stat(tmp_path / "gave-up" / "owner.json").st_mtime == 0
    assert tl.recover_orphans() == ["gave-up"]


def test_owner_final_lands_in_a_folder_deleted_under_it(tmp_path: Path) -> None:
    import shutil

    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=FakeClock())
    tl.claim("t")
    tl.append("t", ev(0))
    shutil.rmtree(tmp_path / "t")
    assert tl.extend("t", [(None, final())]) >= 1
    assert tl.is_final("t") and tl.read("t")[-1][1]["type"] == FINAL_TYPE


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
    assert seq == events[-1][0] and [e["type"] for _, e in events] == ["progress", FINAL_TYPE]
    assert events[-1][1]["data"]["error"]["type"] == "task_lost"


def test_two_instances_recover_same_orphan(tmp_path: Path) -> None:
    clock = FakeClock()
    TaskLog(tmp_path, "owner", lease_seconds=30, clock=clock).claim("t")
    logs = [TaskLog(tmp_path, f"r{i}", lease_seconds=30, clock=clock) for i in range(4)]
    later = clock.t + 31
    results = run_threads(4, lambda i: logs[i].recover_orphans(now=later))
    assert sorted(t for r in results for t in r) == ["t"]
    events = logs[0].read("t")
    assert len(events) == 1 and events[0][1]["data"]["error"]["type"] == "task_lost"


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


# --- batches, the final file and its sidecar ----------------------------------


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


def test_read_since_skips_older_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    for n in range(50):
        tl.extend("t", [(2 * n + 1, ev(2 * n + 1)), (2 * n + 2, ev(2 * n + 2))])
    opened: list[str] = []
    real = tasklog._load

    def spy(path: Path) -> Any:
        opened.append(path.name)
        return real(path)

    monkeypatch.setattr(tasklog, "_load", spy)
    assert [s for s, _ in tl.read("t", since=96)] == [97, 98, 99, 100]
    assert opened == ["00000097.json", "00000099.json"]


def base64_final(task_id: str, images: list[bytes]) -> dict[str, Any]:
    import base64
    return {"type": FINAL_TYPE, "data": {
        "status": "success", "task_id": task_id, "results": [
            {"node_id": "9", "index": i, "output": {
                "comfy": {"filename": f"x{i}.png"},
                "base64": {"data": base64.b64encode(img).decode()}}}
            for i, img in enumerate(images)]}}


def test_final_keeps_base64_in_a_sidecar(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    images = [os.urandom(3000), b"", os.urandom(1)]
    event = base64_final("t", images)
    assert tl.extend("t", [(1, ev(1)), (2, event)]) == 2
    names = sorted(os.listdir(tmp_path / "t"))
    (blob,) = [n for n in names if n.endswith(".blob")]
    # The owner's last flush (event 1) is in the final file too.
    assert names == sorted(["final", blob, "owner.json"])
    # The fsynced final file holds no image data; the sidecar holds the bytes.
    assert len((tmp_path / "t" / "final").read_bytes()) < 1000
    assert (tmp_path / "t" / blob).read_bytes() == b"".join(images)
    # Read back (by another instance too) exactly as written.
    assert TaskLog(tmp_path, "i2").read("t") == [(1, ev(1)), (2, event)]
    assert tl.read("t", since=1) == [(2, event)]
    # A lost sidecar (only a machine crash does that) drops the image data,
    # never the final event.
    (tmp_path / "t" / blob).unlink()
    (_, got), = tl.read("t", since=1)
    assert got["data"]["status"] == "success"
    assert [r["output"] for r in got["data"]["results"]] == [{"comfy": {"filename": f"x{i}.png"}}
                                                             for i in range(3)]


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
    assert [(s, e["type"]) for s, e in tl.read("t")] == [(1, "progress"), (2, FINAL_TYPE)]


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


def test_records_and_usage(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    assert tl.put_record("t", "webhook-1.json", b"{}")
    assert not tl.put_record("t", "webhook-1.json", b"[]")  # exclusive
    assert tl.get_record("t", "webhook-1.json") == b"{}"
    for bad in ("final", "owner.json", "cancel", "00000001.json", "final.x.blob", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            tl.put_record("t", bad, b"")
    tl.append("t", ev(1))
    assert tl.records("t") == ["webhook-1.json"]
    assert [s for s, _ in tl.read("t")] == [1]
    usage = tl.usage("t")
    assert usage.files == 3 and usage.bytes == sum(
        p.stat().st_size for p in (tmp_path / "t").iterdir())


def test_recover_orphans_skips_known_finished_tasks(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=30, clock=clock)
    for n in range(20):
        tl.claim(f"done-{n}")
        tl.append(f"done-{n}", final())
    assert tl.recover_orphans(now=clock.t + 60) == []
    checked: list[str] = []
    real = TaskLog.is_final
    monkeypatch.setattr(TaskLog, "is_final", lambda self, t: checked.append(t) or real(self, t))
    tl.claim("orphan")
    assert tl.recover_orphans(now=clock.t + 60) == ["orphan"]
    assert checked == ["orphan"]  # the 20 finished ones were not looked at again
    # A finished task's folder deleted and its id claimed again is a new task.
    import shutil
    shutil.rmtree(tmp_path / "done-3")
    tl.claim("done-3")
    assert tl.recover_orphans(now=clock.t + 60) == ["done-3"]


def test_only_the_final_file_is_fsynced_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(tasklog.os, "fsync", lambda fd: synced.append(fd) or real(fd))
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
    real = tasklog._listdir
    monkeypatch.setattr(tasklog, "_listdir", lambda d: listed.append(d) or real(d))
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
    assert [(seq, e["type"]) for seq, e in owner.read("u")] == [(1, "progress"), (2, FINAL_TYPE)]
