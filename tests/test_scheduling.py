"""Fair share as a pure data structure: per-key FIFOs served round-robin,
checked over many random interleavings of pushes, pops, releases and removals."""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.errors import KeyQueueFull, QueueFull
from comfy_embed.executor import Executor, Job, Outcome
from comfy_embed.outcome import PendingWrite
from comfy_embed.scheduling import FairQueue, Quota, Quotas, late_reason, latest_start
from tests.test_executor import FakeBackend, make_job

_ids = iter(range(10**9))


@dataclass(eq=False)
class Item:
    key: str
    n: int = field(default_factory=lambda: next(_ids))


def fq(queue: int = 10**6, running: int = 10**6, fair: bool = True,
       per_key: dict[str, Quota] | None = None) -> FairQueue[Item]:
    return FairQueue(lambda i: i.key, Quotas(Quota(queue, running), per_key), fair)


def test_one_key_is_a_fifo_and_fair_share_off_is_arrival_order() -> None:
    for q in (fq(), fq(fair=False)):
        items = [Item(k) for k in "aaaa"] if q.fair else [Item(k) for k in "abcabc"]
        for i in items:
            q.push(i)
        assert q.order() == items
        assert [q.pop() for _ in items] == items
        assert q.pop() is None and len(q) == 0


def test_a_flood_delays_another_key_by_at_most_one_job() -> None:
    q = fq()
    flood = [Item("a") for _ in range(100)]
    for i in flood:
        q.push(i)
    first = q.pop()
    assert first is flood[0]
    b1 = Item("b")
    q.push(b1)  # b never served: it goes before a's next
    assert q.order()[0] is b1
    assert q.pop() is b1
    b2 = Item("b")
    q.push(b2)  # b was served after a: a's next goes first, then b's
    assert q.order()[:2] == [flood[1], b2]
    assert [q.pop(), q.pop()] == [flood[1], b2]


def test_the_order_a_job_would_join_is_the_order_it_joins() -> None:
    q = fq()
    for k in "aaab":
        q.push(Item(k))
    q.pop()
    for k in ("a", "b", "c", ""):
        new = Item(k)
        foreseen = q.order(new)
        assert len(q) == 3 and new not in q.order()  # nothing changed
        q.push(new)
        assert q.order() == foreseen
        q.remove(new)


def test_round_robin_alternates_between_backlogged_keys() -> None:
    q = fq()
    for k in "aaaaabbbcc":
        q.push(Item(k))
    predicted = q.order()
    popped = [q.pop() for _ in range(10)]
    assert popped == predicted
    assert "".join(i.key for i in popped if i) == "abcabcabaa"


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings_keep_every_promise(seed: int) -> None:
    rnd = random.Random(seed)
    keys = ["k1", "k2", "k3", "k4"][:rnd.randint(2, 4)]
    running_bound = rnd.choice([1, 2, 10**6])
    q = fq(running=running_bound)
    pushed: dict[str, list[Item]] = {k: [] for k in keys}
    popped: dict[str, list[Item]] = {k: [] for k in keys}
    out: list[Item] = []  # popped, not yet released
    #: for each waiting item: pops of each other key since it was pushed
    since: dict[Item, dict[str, int]] = {}
    ahead_at_push: dict[Item, int] = {}
    waiting: set[Item] = set()
    for _ in range(600):
        op = rnd.random()
        if op < 0.45:
            item = Item(rnd.choice(keys))
            ahead_at_push[item] = q.waiting(item.key)
            foreseen = q.order(item)
            q.push(item)
            assert q.order() == foreseen
            pushed[item.key].append(item)
            since[item] = {k: 0 for k in keys}
            waiting.add(item)
        elif op < 0.8:
            predicted = q.order()
            item = q.pop()
            if item is None:
                assert not q.ready()
                assert all(q.running(k) >= running_bound for k in keys if q.waiting(k))
                continue
            if running_bound > 10**5:
                assert item is predicted[0]  # the projected order is the real one
            waiting.discard(item)
            popped[item.key].append(item)
            out.append(item)
            assert q.running(item.key) <= running_bound
            # Fairness: no other key took more jobs than the ones of its own
            # key ahead of it, plus one, while it waited (bounds aside).
            if running_bound > 10**5:
                for k, n in since[item].items():
                    if k != item.key:
                        assert n <= ahead_at_push[item] + 1, (k, n, item.key)
            for other in waiting:
                since[other][item.key] += 1
        elif op < 0.92 and out:
            q.release(out.pop(rnd.randrange(len(out))))
        elif waiting:
            victim = rnd.choice(sorted(waiting, key=lambda i: i.n))
            assert q.remove(victim)
            assert not q.remove(victim)
            waiting.discard(victim)
            pushed[victim.key].remove(victim)
        assert len(q) == len(waiting)
        assert set(q.order()) == waiting and len(q.order()) == len(waiting)
    for k in keys:  # each key's own order is kept
        assert popped[k] == pushed[k][:len(popped[k])]


def test_queue_quota_refuses_with_the_limit_named() -> None:
    q = fq(queue=2)
    q.push(Item("a"))
    q.push(Item("a"))
    with pytest.raises(KeyQueueFull) as e:
        q.push(Item("a"))
    assert isinstance(e.value, QueueFull)  # a 429 wherever a full queue is
    assert e.value.details == {"limit": "key_queue", "value": 2}
    assert "key_queue=2" in e.value.message
    q.push(Item("b"))  # another key has its own room
    for _ in range(5):  # anonymous jobs (keys off) have no per-key quota
        q.push(Item(""))
    assert len(q) == 8


def test_running_quota_holds_a_key_back_until_release() -> None:
    q = fq(running=1)
    a1, a2, b1 = Item("a"), Item("a"), Item("b")
    for i in (a1, a2, b1):
        q.push(i)
    assert q.pop() is a1
    assert q.pop() is b1  # a is at its bound: b goes
    assert q.pop() is None and not q.ready()
    q.release(a1)
    assert q.ready() and q.pop() is a2


def test_per_key_quotas_by_hash_prefix() -> None:
    quotas = Quotas.parse(Quota(4, 2), ["deadbeef01=1/1", " ", "CAFEBABE=9/3"])
    assert quotas.of("deadbeef01" + "0" * 54) == Quota(1, 1)
    assert quotas.of("cafebabe" + "1" * 56) == Quota(9, 3)
    assert quotas.of("0123456789") == Quota(4, 2)
    assert quotas.of("") is None
    for bad in ("dead=1/1", "deadbeefzz=1/1", "deadbeef01=0/1", "deadbeef01=1", "deadbeef01"):
        with pytest.raises(ValueError, match="key id"):
            Quotas.parse(Quota(1, 1), [bad])


def test_remove_where_and_clear_give_arrival_order() -> None:
    q = fq()
    items = [Item(k) for k in "abab"]
    for i in items:
        q.push(i)
    assert q.remove_where(lambda i: i.n % 2 == items[0].n % 2) == [items[0], items[2]]
    assert q.clear() == [items[1], items[3]]
    assert len(q) == 0


def test_deadline_arithmetic() -> None:
    assert latest_start(None, 5.0) is None
    assert latest_start(100.0, None) == 100.0
    assert latest_start(100.0, 30.0) == 70.0
    assert "passed 2.0s ago" in late_reason(100.0, None, 102.0)
    assert "takes about 30.0s and 20.0s were left" in late_reason(100.0, 30.0, 80.0)


# ------------------------------------------- the executor on this queue
# (a fake backend: thread and queue mechanics only, as tests/test_executor.py)
def _executor(**kw: Any) -> tuple[Executor, FakeBackend]:
    backend = FakeBackend()
    ex = Executor(lambda: backend, max_queue=500, **kw)
    ex.start()
    ex.wait_ready(5)
    return ex, backend


def _job(pid: str, key: str, done: dict[str, Outcome], told: dict[str, list[int]] | None = None,
         **prompt: Any) -> Job:
    job = make_job(pid, done, [], **prompt)
    job.key = key
    if told is not None:
        job.on_position = lambda n: told.setdefault(pid, []).append(n)
    return job


def test_executor_runs_a_flood_and_a_trickle_round_robin() -> None:
    ex, backend = _executor(quotas=Quotas(Quota(200, 2)))
    try:
        done: dict[str, Outcome] = {}
        told: dict[str, list[int]] = {}
        first = _job("a0", "a", done, block=True)
        ex.submit(first)
        assert backend.started.wait(5)
        flood = [_job(f"a{i}", "a", done, told) for i in range(1, 21)]
        assert [ex.submit(j) for j in flood] == list(range(1, 21))
        b = _job("b0", "b", done, told)
        assert ex.submit(b) == 1  # next, behind the running job only
        # a1 was pushed back by one: it is told so.
        assert told["a1"] == [2] and told.get("b0") is None
        assert [j.prompt_id for j in ex.pending()] == ["b0"] + [f"a{i}" for i in range(1, 21)]
        projected = [j.prompt_id for j in ex.pending()]
        backend.gate.set()
        assert all(j.finished.wait(5) for j in [*flood, b])
        assert backend.order == ["a0", *projected]
        # Each of a's waiting jobs was told it was pushed back by one, then
        # every place it moved up to; b0 (next from the start) nothing more.
        assert "b0" not in told
        for i in range(1, 21):
            assert told[f"a{i}"] == list(range(i + 1, 0, -1))
    finally:
        backend.gate.set()
        ex.close(timeout=5)


def test_executor_without_keys_is_the_fifo() -> None:
    for kw in ({}, {"quotas": Quotas(Quota(1, 1)), "fair": False}):
        ex, backend = _executor(**kw)
        try:
            done: dict[str, Outcome] = {}
            ex.submit(_job("x", "", done, block=True))
            assert backend.started.wait(5)
            jobs = [_job(f"j{i}", "k1" if kw else "", done) for i in range(30)]
            for i, j in enumerate(jobs):
                assert ex.submit(j) == i + 1
            assert ex.pending() == jobs
            backend.gate.set()
            assert all(j.finished.wait(5) for j in jobs)
            assert backend.order == ["x"] + [f"j{i}" for i in range(30)]
        finally:
            backend.gate.set()
            ex.close(timeout=5)


def test_executor_key_quota_is_a_429_with_retry_after() -> None:
    ex, backend = _executor(quotas=Quotas(Quota(2, 1)))
    try:
        done: dict[str, Outcome] = {}
        ex.submit(_job("a0", "a", done, block=True))
        assert backend.started.wait(5)
        ex.submit(_job("a1", "a", done))
        ex.submit(_job("a2", "a", done))
        with pytest.raises(KeyQueueFull) as e:
            ex.submit(_job("a3", "a", done))
        assert e.value.retry_after >= 1 and e.value.details["limit"] == "key_queue"
        ex.submit(_job("b1", "b", done))  # another key is not held back
        assert len(ex.pending()) == 3
    finally:
        backend.gate.set()
        ex.close(timeout=5)


def test_a_job_encoding_its_files_holds_its_keys_running_slot(tmp_path: Path) -> None:
    ex, backend = _executor(quotas=Quotas(Quota(10, 1)))
    try:
        done: dict[str, Outcome] = {}
        w = PendingWrite("9", "SaveImage", tmp_path / "a.png", Future())
        (tmp_path / "a.png").touch()
        a1 = _job("a1", "a", done, writes=[w],
                  images=[{"filename": "a.png", "subfolder": "", "type": "output"}])
        a2, b1 = _job("a2", "a", done), _job("b1", "b", done)
        ex.submit(a1)
        ex.submit(a2)
        ex.submit(b1)
        assert b1.finished.wait(5)  # a2 waits for a1's files; b1 runs meanwhile
        assert backend.order == ["a1", "b1"] and not a2.finished.is_set()
        assert [j.prompt_id for j in ex.pending()] == ["a2"]
        w.future.set_result(None)
        assert a1.finished.wait(5) and a2.finished.wait(5)
        assert backend.order == ["a1", "b1", "a2"]
    finally:
        backend.gate.set()
        ex.close(timeout=5)


def test_cancel_a_queued_job_under_fair_share() -> None:
    ex, backend = _executor(quotas=Quotas(Quota(10, 2)))
    try:
        done: dict[str, Outcome] = {}
        told: dict[str, list[int]] = {}
        ex.submit(_job("a0", "a", done, block=True))
        assert backend.started.wait(5)
        a1, a2, b1 = (_job(p, p[0], done, told) for p in ("a1", "a2", "b1"))
        for j in (a1, a2, b1):
            ex.submit(j)
        assert [j.prompt_id for j in ex.pending()] == ["b1", "a1", "a2"]
        assert ex.cancel("b1") and b1.finished.wait(5) and done["b1"].interrupted
        # Pushed back by b1, then moved up again as it left.
        assert told["a1"] == [2, 1] and told["a2"] == [3, 2] and "b1" not in told
        assert [j.prompt_id for j in ex.pending()] == ["a1", "a2"]
        backend.gate.set()
        assert a2.finished.wait(5) and backend.order == ["a0", "a1", "a2"]
    finally:
        backend.gate.set()
        ex.close(timeout=5)


def test_a_queued_job_past_its_deadline_is_dropped_while_another_runs() -> None:
    ex, backend = _executor()
    try:
        done: dict[str, Outcome] = {}
        told: dict[str, list[int]] = {}
        ex.submit(_job("long", "", done, block=True))
        assert backend.started.wait(5)
        late = _job("late", "", done)
        late.deadline = time.monotonic() + 0.3
        cannot = _job("cannot", "", done)  # would take 60 s, 30 s are left: dropped at once
        cannot.deadline, cannot.estimate = time.monotonic() + 30, 60.0
        fine = _job("fine", "", done, told)
        fine.deadline = time.monotonic() + 300
        for j in (late, cannot, fine):
            ex.submit(j)
        # Both dropped while "long" still runs: the reaper, not the queue's turn.
        assert cannot.finished.wait(5) and late.finished.wait(5)
        assert not backend.gate.is_set() and ex.running == 1
        for pid, why in (("late", "deadline passed"), ("cannot", "takes about 60.0s")):
            out = done[pid]
            assert out.interrupted and not out.success
            assert out.error["reason"].startswith("deadline: ") and why in out.error["reason"]
        assert told["fine"][-1] == 1  # moved up as the others went
        backend.gate.set()
        assert fine.finished.wait(5) and done["fine"].success
        assert backend.order == ["long", "fine"]
    finally:
        backend.gate.set()
        ex.close(timeout=5)


def test_quota_settings_are_checked_at_start_up() -> None:
    from comfy_embed.config import Settings
    from comfy_embed.config.rules import SettingsError

    s = Settings(key_quotas=("deadbeef01=3/1", "cafebabe=9/2"), key_queue=5, key_running=1)
    quotas = Quotas.parse(Quota(s.jobs.key_queue, s.jobs.key_running), s.jobs.key_quotas)
    assert quotas.of("deadbeef01ff") == Quota(3, 1) and quotas.of("00000000") == Quota(5, 1)
    for bad in ({"key_quotas": ("dead=3/1",)}, {"key_quotas": ("deadbeef01=0/1",)},
                {"key_queue": 0}, {"key_running": 0}):
        with pytest.raises(SettingsError, match="COMFY_EMBED_KEY_"):
            Settings(**bad)
