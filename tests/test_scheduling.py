"""Fair share as a pure data structure: per-key FIFOs served round-robin,
checked over many random interleavings of pushes, pops, releases and removals."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from comfy_embed.errors import KeyQueueFull, QueueFull
from comfy_embed.scheduling import FairQueue, Quota, Quotas, late_reason, latest_start

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
            q.push(item)
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
