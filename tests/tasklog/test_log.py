"""Tests for comfy_embed.tasklog.log (TaskLog: claims, reads, cancel, recovery,
records) on real files (tmp_path), threads and processes. Its helpers serve
the other tests of the package."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.events import FINAL
from comfy_embed.tasklog.log import TaskLog


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
    return {"type": FINAL, "data": {"status": status, "results": []}}


def base64_final(task_id: str, images: list[bytes]) -> dict[str, Any]:
    import base64
    return {"type": FINAL, "data": {
        "status": "success", "task_id": task_id, "results": [
            {"node_id": "9", "index": i, "output": {
                "comfy": {"filename": f"x{i}.png"},
                "base64": {"data": base64.b64encode(img).decode()}}}
            for i, img in enumerate(images)]}}


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


# --- basics -----------------------------------------------------------------


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


# --- cancel, recovery -------------------------------------------------------


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
    assert [e["type"] for _, e in events] == ["progress", FINAL]
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


def test_two_instances_recover_same_orphan(tmp_path: Path) -> None:
    clock = FakeClock()
    TaskLog(tmp_path, "owner", lease_seconds=30, clock=clock).claim("t")
    logs = [TaskLog(tmp_path, f"r{i}", lease_seconds=30, clock=clock) for i in range(4)]
    later = clock.t + 31
    results = run_threads(4, lambda i: logs[i].recover_orphans(now=later))
    assert sorted(t for r in results for t in r) == ["t"]
    events = logs[0].read("t")
    assert len(events) == 1 and events[0][1]["data"]["error"]["type"] == "task_lost"


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


# --- records ----------------------------------------------------------------


def test_records_and_usage(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    assert tl.put_record("t", "webhook-1.json", b"{}")
    assert not tl.put_record("t", "webhook-1.json", b"[]")  # exclusive
    assert tl.get_record("t", "webhook-1.json") == b"{}"
    assert tl.has_record("t", "webhook-1.json") and not tl.has_record("t", "other")
    assert tl.get_record("t", "other") is None
    for bad in ("final", "owner.json", "cancel", "owner_key", "00000001.json", "final.x.blob",
                ".hidden", "a/b"):
        with pytest.raises(ValueError):
            tl.put_record("t", bad, b"")
        with pytest.raises(ValueError):
            tl.get_record("t", bad)
    tl.append("t", ev(1))
    tl.set_key_hash("t", "hash")
    tl.request_cancel("t")
    assert tl.put_record("t", "webhook-2.json", b"{}")
    assert tl.records("t") == ["webhook-1.json", "webhook-2.json"]
    assert tl.records("t", "webhook-2") == ["webhook-2.json"]
    assert [s for s, _ in tl.read("t")] == [1]
    usage = tl.usage("t")
    assert usage.files == 6 and usage.bytes == sum(
        p.stat().st_size for p in (tmp_path / "t").iterdir())


def test_records_ride_in_the_final_file(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    record = b'{"graph":{"1":{"class_type":"EmptyImage"}},"environment":{"torch":"2"}}'
    # Not with a batch that has no final event.
    tl.extend("t", [(1, ev(1))], {"replay.json": record})
    assert tl.final_record("t", "replay.json") is None
    tl.extend("t", [(2, ev(2)), (3, final())], {"replay.json": record})
    assert tl.final_record("t", "replay.json") == {
        "graph": {"1": {"class_type": "EmptyImage"}}, "environment": {"torch": "2"}}
    assert tl.final_record("t", "other") is None
    # No file of its own; the events read as before.
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "00000001.json", "final", "owner.json"]
    assert tl.read("t") == [(1, ev(1)), (2, ev(2)), (3, final())]
    # A final that does not count (one is there) brings no records.
    tl.extend("t", [(4, final("error"))], {"late.json": b"{}"})
    assert tl.final_record("t", "late.json") is None
    # A final written without a claim (a rescuer's) keeps them too; none: None.
    tl.extend("u", [(None, final())], {"replay.json": b"[1]"})
    assert tl.final_record("u", "replay.json") == [1]
    tl.claim("v")
    tl.append("v", final())
    assert tl.final_record("v", "replay.json") is None
    assert tl.final_record("never", "replay.json") is None


def test_a_final_written_with_settle_later_is_fsynced_and_indexed_at_settle_final(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    tl = TaskLog(tmp_path, "i1")
    for task_id in ("now", "later", "lost"):
        tl.claim(task_id)
    tl.extend("now", [(1, final())])
    assert len(synced) == 1  # fsynced before extend returned
    tl.extend("later", [(1, ev(1)), (2, final())], settle_later=True)
    assert len(synced) == 1  # written, not yet fsynced
    assert TaskLog(tmp_path, "reader").read("later")[-1] == (2, final())  # readable at once
    assert tl.open_index.names() == ["later", "lost"]  # not moved yet
    tl.settle_final("later")
    assert len(synced) >= 2  # the final file (and its folder)
    assert tl.open_index.names() == ["lost"]
    assert sorted(n for _, names in tl.done_index.older_than(float("inf")) for n in names) == [
        "later", "now"]
    tl.settle_final("later")  # twice, or for a task written without it: nothing
    tl.settle_final("now")
    # A final that did not count leaves nothing to move.
    tl.append("lost", final("error"))
    tl.extend("lost", [(5, final())], settle_later=True)
    tl.settle_final("lost")
    assert tl.open_index.names() == []
    # A recovery scan in between moves it as well (a crash before settle_final).
    tl.claim("crashed")
    tl.extend("crashed", [(1, final())], settle_later=True)
    assert tl.open_index.names() == ["crashed"]
    tl.recover_orphans()  # the first scan of a new log looks at every folder, indexes
    assert tl.recover_orphans() == [] and tl.open_index.names() == []


def test_the_lease_is_the_open_index_entry_linked(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", clock=clock)
    assert tl.claim("t")
    lease, entry = tmp_path / "t" / "owner.json", tmp_path / "@index" / "open" / "t"
    assert os.path.samefile(lease, entry)  # one file created for both
    assert tl.owner("t") == "i1" and lease.stat().st_mtime == clock.t
    tl.append("t", final())  # the entry moves to the done index: the lease stays
    assert not entry.exists() and tl.owner("t") == "i1"
    # A stale entry of the same name is kept; the lease is a file of its own.
    os.close(os.open(tmp_path / "@index" / "open" / "stale", os.O_CREAT | os.O_WRONLY))
    assert tl.claim("stale") and tl.owner("stale") == "i1"
    assert not os.path.samefile(tmp_path / "stale" / "owner.json",
                                tmp_path / "@index" / "open" / "stale")
    # A filesystem without hard links: a file of its own, and no link tried again.
    tries = []

    def no_link(*args: Any, **kw: Any) -> None:
        tries.append(args)
        raise OSError(errno.EPERM, "no hard links here")
    monkeypatch.setattr(os, "link", no_link)
    for task_id in ("u", "v"):
        assert tl.claim(task_id) and tl.owner(task_id) == "i1"
        assert (tmp_path / "@index" / "open" / task_id).exists()
    assert len(tries) == 1
    tl.renew(["u"])
    assert tl.recover_orphans(now=clock.t + 10) == []


def test_a_record_never_brings_back_a_deleted_task(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    with pytest.raises(FileNotFoundError):
        tl.put_record("gone", "webhook.result.0001.json", b"{}")
    assert not tl.exists("gone") and tl.records("gone") == []


def test_task_ids_lists_only_task_folders(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path / "log", "i1")
    assert tl.task_ids() == []
    for task in ("b", "a"):
        tl.claim(task)
    tl.append("c", final())  # written without a claim (a rescuer's final)
    assert tl.task_ids() == ["a", "b", "c"]  # not the index folder
