"""Tests for comfy_embed.tasklog.leases, the one lease primitive, and the
task leases TaskLog takes with it. Real files under tmp_path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from comfy_embed.tasklog.leases import RELEASED, Leases
from comfy_embed.tasklog.log import TaskLog

from tests.tasklog.test_log import FakeClock, final

# --- the primitive ----------------------------------------------------------


def test_a_lease_is_taken_once(tmp_path: Path) -> None:
    clock = FakeClock()
    a, b = Leases("a", 30, clock), Leases("b", 30, clock)
    path = tmp_path / "lease"
    assert a.take(path)
    assert not b.take(path) and not a.take(path)
    assert Leases.holder(path) == "a"
    assert a.renewed_at(path) == clock.t  # a fake clock is written into the mtime
    assert sorted(os.listdir(tmp_path)) == ["lease"]  # published: no temp file left


def test_a_lock_is_dropped_by_its_holder_only(tmp_path: Path) -> None:
    """The model download lock's way: the file goes when the work is done."""
    clock = FakeClock()
    a, b = Leases("a", 30, clock), Leases("b", 30, clock)
    path = tmp_path / "model.lock"
    assert a.take(path)
    b.drop(path)
    assert path.exists() and Leases.holder(path) == "a"
    a.drop(path)
    assert not path.exists() and b.take(path)


def test_an_expired_lock_is_broken_by_one_waiter(tmp_path: Path) -> None:
    clock = FakeClock()
    dead, w1, w2 = Leases("dead", 2, clock), Leases("w1", 2, clock), Leases("w2", 2, clock)
    path = tmp_path / "model.lock"
    assert dead.take(path)
    assert w1.live(path)  # renewed now: nobody may break it
    clock.t += 3
    assert not w1.live(path)
    assert w1.break_expired(path) == "dead"  # the rename wins, the holder is named
    assert w2.break_expired(path) is None  # the other waiter finds nothing to break
    assert w2.take(path) and not w1.take(path)
    assert sorted(os.listdir(tmp_path)) == ["model.lock"]  # nothing left aside


def test_a_lease_in_a_folder_of_ones_own(tmp_path: Path) -> None:
    """The claim's way: a plain exclusive create, the lease starting at once."""
    leases = Leases("me", 30)  # the real clock: the file's creation is the renewal
    before = time.time()
    assert leases.take(tmp_path / "owner.json", folder_is_ours=True)
    assert not leases.take(tmp_path / "owner.json", folder_is_ours=True)
    assert before - 1 <= leases.renewed_at(tmp_path / "owner.json") <= time.time() + 1
    assert Leases.holder(tmp_path / "owner.json") == "me"


def test_expiry_renewal_and_release(tmp_path: Path) -> None:
    clock = FakeClock()
    leases = Leases("me", 30, clock)
    path = tmp_path / "lease"
    assert not leases.live(path)  # none yet
    leases.take(path)
    clock.t += 30
    assert leases.live(path)
    clock.t += 1
    assert not leases.live(path) and leases.live(path, now=clock.t - 5)
    assert leases.renew(path) and leases.live(path)
    leases.release(path)
    assert leases.renewed_at(path) == RELEASED and not leases.live(path)
    path.unlink()
    assert not leases.renew(path)  # gone: nothing to renew
    leases.release(path)  # nor to release
    with pytest.raises(FileNotFoundError):
        leases.renewed_at(path)


def test_holder_of_an_unreadable_lease(tmp_path: Path) -> None:
    assert Leases.holder(tmp_path / "missing") is None
    for raw in (b"", b"{half", b"[]", b'{"instance_id": 7}'):
        (tmp_path / "lease").write_bytes(raw)
        assert Leases.holder(tmp_path / "lease") is None, raw


# --- its users: the task leases and the delivery leases ---------------------


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


def test_task_and_delivery_leases_share_the_logs_leases(tmp_path: Path) -> None:
    from comfy_embed.tasklog.delivery import DeliveryLog

    clock = FakeClock()
    tl = TaskLog(tmp_path, "i1", lease_seconds=12, clock=clock)
    deliveries = DeliveryLog(tl)
    assert deliveries.leases is tl.leases
    assert (tl.instance_id, tl.lease_seconds, deliveries.lease_seconds) == ("i1", 12, 12)
    tl.claim("t")
    assert deliveries.register("t", {"url": "http://x"})
    assert deliveries.claim("t") == 1
    for name in ("owner.json", "webhook.lease.0001"):
        assert Leases.holder(tmp_path / "t" / name) == "i1"
        assert tl.leases.renewed_at(tmp_path / "t" / name) == clock.t
